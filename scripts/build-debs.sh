#!/bin/bash
# scripts/build-debs.sh: the Debian packages, into target/debian/:
#   miden-proving-service_*.deb  the program (generic build in /usr/bin, the x86-64-v3 build it
#                                starts where the CPU runs it in /usr/lib), man pages, completions
#   miden-prover_*.deb           the worker service: unit, /etc/miden-prover/worker.toml, user
#   miden-prover-proxy_*.deb     the proxy service: unit, /etc/miden-prover-proxy/proxy.toml,
#                                user, minedctl, monitoring files
#
#   scripts/build-debs.sh                     release builds (two full builds: generic and x86-64-v3)
#   MPSDEV_DEB_PROFILE=dev scripts/build-debs.sh the dev-profile builds the tests ran (.ci/run)
#
# Needs cargo-deb (`cargo install cargo-deb --locked`). The binaries are built here and staged in
# target/deb-staging (stripped; man pages gzipped), then `cargo deb --no-build` packages the three
# [package.metadata.deb] variants of Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${MPSDEV_DEB_PROFILE:-release}
case $profile in
release) generic=(--release --bins --example gen_assets) fast=(--release --bins) out=release ;;
# The same target selection as .ci/run's builds, so that nothing is rebuilt with other features.
dev) generic=(--bins --examples) fast=(--bins) out=debug ;;
*) echo "build-debs: MPSDEV_DEB_PROFILE is release or dev, not '$profile'" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-debs: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi

# The service packages depend on exactly this version of the common one (cargo-deb has no
# variable for it), so the pin in Cargo.toml must follow `version`.
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
deb_version="$(echo "$version" | sed 's/-/~/')-1"
pins=$(grep -c "miden-proving-service (= $deb_version)" Cargo.toml || true)
if [ "$pins" != 2 ]; then
    echo "build-debs: Cargo.toml's variants must depend on 'miden-proving-service (= $deb_version)'" >&2
    echo "(the package version of $version); update both depends lines." >&2
    exit 1
fi

cargo build --locked "${generic[@]}"
MPSDEV_TARGET_CPU=x86-64-v3 scripts/build-fast.sh "${fast[@]}"

stage=target/deb-staging
rm -rf "$stage"
mkdir -p "$stage"
strip_to() {
    strip --strip-unneeded --remove-section=.comment --remove-section=.note -o "$2" "$1"
}
strip_to "target/$out/miden-proving-service" "$stage/miden-proving-service"
strip_to "target/$out/minedctl" "$stage/minedctl"
strip_to "target/x86-64-v3/$out/miden-proving-service" "$stage/miden-proving-service.x86-64-v3"
"target/$out/examples/gen_assets" "$stage" >/dev/null
# The staged binaries are the builds their names say (RUSTFLAGS in the environment, say, would
# override the fast build's target CPU), and need no newer glibc than the packages depend on.
grep -q '(x86-64-v3 build)' "$stage/miden-proving-service.x86-64-v3" ||
    { echo "build-debs: the staged x86-64-v3 binary is not an x86-64-v3 build" >&2; exit 1; }
grep -q '(generic build)' "$stage/miden-proving-service" ||
    { echo "build-debs: the staged /usr/bin binary is not the generic build" >&2; exit 1; }
glibc=$(objdump -T "$stage"/miden-proving-service* "$stage/minedctl" | grep -o 'GLIBC_[0-9.]*' |
    sed 's/GLIBC_//' | sort -V | tail -1)
if ! grep -q "libc6 (>= $glibc)" Cargo.toml; then
    echo "build-debs: the binaries need glibc $glibc; Cargo.toml's depends say otherwise" >&2
    exit 1
fi
gzip -9n "$stage"/man/*.1

rm -f target/debian/*.deb target/debian/SHA256SUMS
for variant in "" prover proxy; do
    cargo deb --no-build --locked --no-dbgsym ${variant:+--variant "$variant"} -o target/debian/
done
ls -l target/debian/*.deb
(cd target/debian && sha256sum -- *.deb >SHA256SUMS)
echo "build-debs: checksums in target/debian/SHA256SUMS (check with: sha256sum -c SHA256SUMS)"
