#!/bin/bash
# tests/packages.sh [DEB DIR]: the Debian packages under a real systemd. Boots this machine's
# systemd as PID 1 in a throw-away container (tests/sysd-ct.sh), installs the packages of
# target/debian (scripts/build-debs.sh) with dpkg -i, and checks what an operator relies on:
# both units active and READY, a real transaction proved through the proxy by the upstream client,
# reload of an edited worker list, minedctl as root and as nobody, the journal's structured
# fields, a stop while a proof is in flight, a reinstall that keeps an edited conffile, purge.
# Before that, lintian and systemd-analyze on the packages and units. Needs root.
#
# The client is examples/prove_file of the dev build (cargo build --locked --examples).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
debs=$(cd "${1:-target/debian}" && pwd)
client=$root/target/debug/examples/prove_file
inputs=$root/target/packages-test/tx.inputs
ct=mps-packages-$$
failures=0

say() { printf '\n== %s\n' "$*"; }
pass() { printf 'ok: %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*"
    failures=$((failures + 1))
}
in_ct() { tests/sysd-ct.sh exec "$ct" "$@"; }
# wait_for SECONDS DESCRIPTION CMD…: polls CMD every 0.2 s.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then
            pass "$what"
            return 0
        fi
        sleep 0.2
    done
    fail "$what (not within ${seconds} s)"
    return 1
}
show() { in_ct systemctl show -p "$2" --value "$1"; }

for tool in lintian systemd-analyze; do
    command -v $tool >/dev/null || {
        echo "packages.sh: $tool is missing (apt-get install lintian systemd)" >&2
        exit 1
    }
done
[ -x "$client" ] || {
    echo "packages.sh: $client is missing: cargo build --locked --examples" >&2
    exit 1
}
ls "$debs"/miden-proving-service_*.deb "$debs"/miden-prover_*.deb \
    "$debs"/miden-prover-proxy_*.deb >/dev/null
mkdir -p "$(dirname "$inputs")"
[ -f "$inputs" ] || "$client" write-inputs "$inputs" >/dev/null

say "lintian: no errors, no warnings"
# (lintian warns that it runs as root; the packages are only read.)
if lintian_out=$(lintian --fail-on error,warning "$debs"/*.deb 2>&1); then
    pass "lintian: $(echo "$lintian_out" | grep -v 'running with root privileges' || echo silent)"
else
    fail "lintian: $lintian_out"
fi

say "the units, offline: systemd-analyze security exposure ≤ 2.0"
for unit in miden-prover miden-prover-proxy; do
    if out=$(systemd-analyze security --offline=true --threshold=20 "systemd/$unit.service" 2>&1); then
        pass "$(echo "$out" | grep 'Overall exposure')"
    else
        fail "$unit: $(echo "$out" | grep -v '✓' | tail -20)"
    fi
done

trap 'tests/sysd-ct.sh stop "$ct" || true' EXIT
SYSD_CT_BIND="$root/target $debs" tests/sysd-ct.sh start "$ct"

say "dpkg -i: both units active, READY=1 reached, status shown"
in_ct dpkg -i "$debs"/miden-proving-service_*.deb "$debs"/miden-prover_*.deb \
    "$debs"/miden-prover-proxy_*.deb
for unit in miden-prover miden-prover-proxy; do
    # systemd-analyze verify: the ExecStart binary now exists; any output is a finding.
    out=$(in_ct systemd-analyze verify --man=no "/usr/lib/systemd/system/$unit.service" 2>&1) || true
    if [ -z "$out" ]; then pass "systemd-analyze verify $unit.service: silent"; else fail "verify $unit: $out"; fi
    # A Type=notify unit becomes active only on READY=1.
    wait_for 30 "$unit active (Type=notify: READY=1 seen)" \
        sh -c "[ \"\$(tests/sysd-ct.sh exec $ct systemctl is-active $unit)\" = active ]"
done
status=$(show miden-prover StatusText)
[ "$status" = idle ] && pass "miden-prover StatusText: $status" || fail "miden-prover StatusText: '$status'"
wait_for 30 "miden-prover-proxy StatusText shows the local worker healthy" \
    sh -c "tests/sysd-ct.sh exec $ct systemctl show -p StatusText --value miden-prover-proxy | grep -q '^1/1 workers healthy'"
echo "   miden-prover-proxy StatusText: $(show miden-prover-proxy StatusText)"
for unit in miden-prover miden-prover-proxy; do
    [ "$(show $unit User)" = "$unit" ] && in_ct getent passwd "$unit" >/dev/null &&
        pass "$unit runs as its own system user" || fail "$unit user"
    # Descriptors above every connection bound (a soft limit of 1024 ran out at ~1,000 idle
    # connections): the unit's LimitNOFILE=65536, or the machine's hard limit where that is
    # lower (systemd cannot raise a limit above the one it runs under).
    pid=$(show $unit MainPID)
    limit=$(in_ct awk '/^Max open files/ {print $4}' /proc/$pid/limits)
    hard=$(in_ct awk '/^Max open files/ {print $5}' /proc/1/limits)
    want=65536
    [ "$hard" = unlimited ] || [ "$hard" -ge $want ] || want=$hard
    [ "$limit" = "$want" ] && pass "$unit may open $limit descriptors (LimitNOFILE=65536, hard limit $hard)" ||
        fail "$unit descriptor limit: $limit, not $want (LimitNOFILE=65536, hard limit $hard)"
done
# As installed, the proxy's gRPC port is public and its status port local (/proc/net/tcp: hex
# address:port, state 0A is LISTEN).
listening() { in_ct awk -v want="$1" '$2 == want && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp; }
listening 00000000:1F92 && listening 0100007F:1F93 && ! listening 00000000:1F93 &&
    pass "the proxy's gRPC port 8082 listens on 0.0.0.0, its status port 8083 on 127.0.0.1" ||
    fail "proxy listeners: $(in_ct awk '$4 == "0A" {print $2}' /proc/net/tcp | tr '\n' ' ')"
# The program picks its build at start: x86-64-v3 where the CPU has AVX2 & co, otherwise generic.
# The installed fast build says which: it refuses to start on a CPU that lacks a feature it was
# compiled for (src/cpu_check.c), the features src/cpu.rs checks before handing over to it.
want=x86-64-v3
in_ct /usr/lib/miden-proving-service/miden-proving-service.x86-64-v3 --version >/dev/null 2>&1 ||
    want=generic
# The worker is ready before journald has necessarily stored its first line: poll for it.
logs_build() { in_ct journalctl -u miden-prover -o json --no-pager | grep -q "\"BUILD\":\"$1\""; }
wait_for 10 "the worker runs the $want build on this CPU (BUILD=$want in its journal)" \
    logs_build "$want" || true

say "a real transaction through the proxy to the local worker (miden-remote-prover-client)"
if out=$(in_ct "$client" remote http://127.0.0.1:8082 "$inputs" 2>&1); then
    pass "$out"
else
    fail "prove through the proxy: $out"
fi

say "reload: edit the worker list, systemctl reload miden-prover-proxy"
in_ct sed -i 's/^workers = \["127.0.0.1:50051"\]/workers = ["127.0.0.1:50051", "127.0.0.1:50052"]/' \
    /etc/miden-prover-proxy/proxy.toml
in_ct grep -q '127.0.0.1:50052' /etc/miden-prover-proxy/proxy.toml
in_ct systemctl reload miden-prover-proxy
# systemd 252 returns from reload before the daemon has handled SIGHUP: poll.
wait_for 30 "minedctl workers lists the worker added to proxy.toml" \
    sh -c "tests/sysd-ct.sh exec $ct minedctl workers | grep -q 127.0.0.1:50052"
[ "$(in_ct systemctl is-active miden-prover-proxy)" = active ] && pass "still active after reload" ||
    fail "proxy not active after reload"

say "minedctl: root may add a worker, nobody may not"
if out=$(in_ct minedctl add-worker 127.0.0.1:50053 2>&1); then pass "root: $out"; else fail "root: $out"; fi
in_ct minedctl workers | grep -q 127.0.0.1:50053 && pass "the worker is listed" || fail "50053 not listed"
# (The 0700 RuntimeDirectory stops nobody at connect(); the peer-credential check behind it is
# tested in tests/it/control.rs with an open directory.)
if out=$(in_ct runuser -u nobody -- minedctl add-worker 127.0.0.1:50054 2>&1); then
    fail "nobody was allowed: $out"
elif echo "$out" | grep -q 'is root-only'; then
    pass "nobody refused: $out"
else
    fail "nobody failed for another reason: $out"
fi
workers=$(in_ct minedctl workers)
echo "$workers" | grep -q 127.0.0.1:50051 && ! echo "$workers" | grep -q 127.0.0.1:50054 &&
    pass "nothing added by nobody" || fail "worker list after nobody's attempt: $workers"

say "systemctl restart miden-prover-proxy: the worker added with minedctl comes back"
state=/var/lib/miden-prover-proxy/workers
wait_for 10 "$state lists 127.0.0.1:50053" in_ct grep -qx 127.0.0.1:50053 $state ||
    echo "$state: $(in_ct cat $state 2>&1)"
since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
in_ct systemctl restart miden-prover-proxy
runtime_worker() {
    in_ct minedctl workers --json | python3 -c 'import json, sys
sys.exit(not any(w["address"] == sys.argv[1] and w["origin"] == "runtime" for w in json.load(sys.stdin)))' "$1"
}
restored() {
    in_ct journalctl -u miden-prover-proxy --since "$since" --no-pager |
        grep -q 'restored 1 workers added at run time'
}
wait_for 30 "127.0.0.1:50053 is back as a runtime worker" runtime_worker 127.0.0.1:50053
wait_for 10 "the journal says it restored it" restored
in_ct minedctl remove-worker 127.0.0.1:50053 >/dev/null

say "journalctl -u miden-prover -o json: structured fields and PRIORITY"
if in_ct journalctl -u miden-prover -o json --no-pager | python3 -c '
import json, sys
entries = [json.loads(line) for line in sys.stdin]
done = [e for e in entries if e.get("MESSAGE") == "proof done"]
assert done, "no \"proof done\" entry"
e = done[-1]
for key in ("PRIORITY", "OUTCOME", "DURATION_MS", "PROOF_BYTES", "PROOF_TYPE", "SUBJECT"):
    assert key in e, f"{key} missing from {sorted(e)}"
assert e["PRIORITY"] == "6" and e["OUTCOME"] == "proved", e
start = [x for x in entries if x.get("MESSAGE", "").startswith("worker listening on")]
assert start and start[-1]["PRIORITY"] == "6" and "BUILD" in start[-1], start
print("proof done:", " ".join(k + "=" + e[k][:20] for k in ("PRIORITY", "OUTCOME", "PROOF_TYPE", "DURATION_MS", "SUBJECT")))
'; then pass "journal fields"; else fail "journal fields"; fi

say "the worker keeps its last proofs: the same input again is answered without proving"
since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
if out=$(in_ct "$client" remote http://127.0.0.1:50051 "$inputs" 2>&1); then
    pass "the same transaction straight to the worker: $out"
else
    fail "the same transaction straight to the worker: $out"
fi
kept() {
    in_ct journalctl -u miden-prover --since "$since" --no-pager |
        grep -q "answered with an identical request's proof"
}
wait_for 10 "the journal says it was answered with the kept proof" kept
# The kept proof lives in the worker's memory: a restart empties it, so that the stop below
# finds the same input being proved.
in_ct systemctl restart miden-prover
wait_for 30 "miden-prover idle after a restart" \
    sh -c "tests/sysd-ct.sh exec $ct systemctl show -p StatusText --value miden-prover | grep -q '^idle'"

say "systemctl stop miden-prover while it proves: the client gets its proof, no SIGKILL"
since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
in_ct "$client" remote http://127.0.0.1:50051 "$inputs" >"$root/target/packages-test/stop.out" 2>&1 &
client_pid=$!
wait_for 30 "the worker is proving" \
    sh -c "tests/sysd-ct.sh exec $ct systemctl show -p StatusText --value miden-prover | grep -q '^proving'"
in_ct systemctl stop miden-prover
if wait $client_pid; then pass "client: $(cat "$root/target/packages-test/stop.out")"; else
    fail "client during stop: $(cat "$root/target/packages-test/stop.out")"
fi
result=$(show miden-prover Result)
[ "$result" = success ] && pass "stop result: $result" || fail "stop result: $result"
if in_ct journalctl -u miden-prover --since "$since" --no-pager | grep -Ei 'SIGKILL|killing'; then
    fail "the journal shows a kill"
else
    pass "no SIGKILL in the journal"
fi
in_ct systemctl start miden-prover
wait_for 30 "miden-prover active again" \
    sh -c "[ \"\$(tests/sysd-ct.sh exec $ct systemctl is-active miden-prover)\" = active ]"

say "reinstall keeps an edited conffile; purge removes users, units and files"
in_ct sh -c 'echo "# edited by the operator" >> /etc/miden-prover/worker.toml'
in_ct dpkg -i "$debs"/miden-proving-service_*.deb "$debs"/miden-prover_*.deb \
    "$debs"/miden-prover-proxy_*.deb
in_ct grep -q '^# edited by the operator$' /etc/miden-prover/worker.toml &&
    pass "the edited worker.toml survived the reinstall" || fail "worker.toml was replaced"
in_ct grep -q '127.0.0.1:50052' /etc/miden-prover-proxy/proxy.toml &&
    pass "the edited proxy.toml survived the reinstall" || fail "proxy.toml was replaced"
for unit in miden-prover miden-prover-proxy; do
    wait_for 30 "$unit active after the reinstall" \
        sh -c "[ \"\$(tests/sysd-ct.sh exec $ct systemctl is-active $unit)\" = active ]"
done
in_ct dpkg --purge miden-prover-proxy miden-prover miden-proving-service
left=""
for user in miden-prover miden-prover-proxy; do
    in_ct getent passwd $user >/dev/null && left="$left user:$user"
    in_ct getent group $user >/dev/null && left="$left group:$user"
done
for path in /etc/miden-prover /etc/miden-prover-proxy /var/lib/miden-prover-proxy \
    /usr/bin/miden-proving-service \
    /usr/bin/minedctl /usr/lib/miden-proving-service /usr/lib/systemd/system/miden-prover.service \
    /usr/lib/systemd/system/miden-prover-proxy.service /usr/lib/sysusers.d/miden-prover.conf \
    /etc/systemd/system/multi-user.target.wants/miden-prover.service \
    /etc/systemd/system/multi-user.target.wants/miden-prover-proxy.service; do
    in_ct test -e $path && left="$left $path"
done
units=$(in_ct systemctl list-unit-files --no-legend 'miden-*' || true)
[ -n "$units" ] && left="$left units:$units"
[ -z "$left" ] && pass "purge left nothing" || fail "purge left:$left"

echo
if [ $failures -gt 0 ]; then
    echo "packages.sh: $failures check(s) failed"
    exit 1
fi
echo "packages.sh: all checks passed"
