#!/bin/bash
# scripts/fuzz.sh SECONDS [TARGET…]: a coverage-guided fuzzing campaign of the payload decoders
# (fuzz/, cargo-fuzz + libFuzzer on the nightly toolchain), SECONDS per target, the targets one
# after another (default: all three). Seeds are real MockChain payloads (the ignored test
# hostile::write_fuzz_seeds);
# the corpus grows in target/fuzz-corpus. Prints, per target, executions, coverage and findings;
# MPSDEV_FUZZ_RUNS=N ends a target after N executions instead, when that comes first. Exits 1
# when any target found a crash, an abort, a leak, an allocation over the limit or a
# hang (saved in fuzz/artifacts/TARGET, to become a regression test).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode_transaction decode_batch decode_block)

rustup run nightly rustc --version >/dev/null 2>&1 ||
    { echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2; exit 2; }
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

seeds=$PWD/target/fuzz-seeds
if [ ! -d "$seeds/decode_block" ]; then
    MPSDEV_FUZZ_SEEDS=$seeds cargo test --locked --test it -- --ignored --exact hostile::write_fuzz_seeds
fi

# One instrumented build of all targets (release: the Miden stack at full speed, as in the
# service's dev profile, without debug assertions, as the service runs; without cfg(fuzzing),
# under which miden-crypto 0.18.5 does not compile: `compute_mutations` in smt/full/mod.rs).
# cargo-fuzz
# has no --locked: fetching with it first makes the build use fuzz/Cargo.lock as it is.
(cd fuzz && cargo +nightly fetch --locked && cargo +nightly fuzz build -O --no-cfg-fuzzing)

found=0
since=$(mktemp)
for target in "${targets[@]}"; do
    corpus=target/fuzz-corpus/$target
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    log=$(mktemp)
    # Limits: memory a decode really uses beyond 2 GiB is a finding; a single allocation over
    # 2 GiB is refused as the prover process's address-space limit would (fuzz/src/lib.rs), so
    # -malloc_limit_mb, above it, never fires before that refusal. A unit slower than 10 s is a
    # hang.
    status=0
    (cd fuzz && cargo +nightly fuzz run -O --no-cfg-fuzzing "$target" \
        "../$corpus" "$seeds/$target" "../tests/fixtures/fuzz/$target" -- \
        -max_total_time="$seconds" ${MPSDEV_FUZZ_RUNS:+-runs=$MPSDEV_FUZZ_RUNS} -rss_limit_mb=2048 -malloc_limit_mb=4096 -timeout=10 \
        -max_len=1048576 -print_final_stats=1 -close_fd_mask=1) >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -oE '(cov|ft): [0-9]+' "$log" | tail -2 | tr '\n' ' ' || true)
    # Only what this run found: earlier findings stay until they are turned into tests.
    artifacts=$(find "fuzz/artifacts/$target" -type f -newer "$since" | wc -l)
    echo "fuzz: $target: $execs executions in ${seconds}s, ${cov:-no coverage line}, corpus $(find "$corpus" -type f | wc -l) inputs, $artifacts findings (exit $status)"
    # Panics the decoder caught (the payload is refused as malformed, as in the prover process):
    # not findings, but their sites are worth knowing.
    refused=$(grep -cE '^memory allocation of [0-9]+ bytes failed' "$log" || true)
    [ "$refused" -eq 0 ] ||
        echo "fuzz: $target:   contained allocation over the prover process's limit, $refused times"
    grep -oE 'panicked at [^ ]+:[0-9]+:[0-9]+' "$log" | grep -v 'at src/lib.rs:' | sed -E 's#^panicked at ##; s#.*/index\.crates\.io-[^/]*/##; s#^/rustc/[0-9a-f]+/##' |
        sort | uniq -c | sort -rn | sed "s#^ *\([0-9]*\) #fuzz: $target:   contained panic, \1 times: #" || true
    if [ "$status" -ne 0 ] || [ "$artifacts" -gt 0 ]; then
        found=1
        grep -E '^==[0-9]+==|SUMMARY|ERROR|artifact_prefix|Test unit written' "$log" | head -20 >&2 || true
        find "fuzz/artifacts/$target" -type f -newer "$since" >&2
    fi
    rm -f "$log"
done
rm -f "$since"
exit $found
