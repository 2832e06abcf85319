#!/bin/bash
# tests/run.sh [CARGO TEST ARGS…]: the test command. Sets up what the tests need on a Debian 12
# machine, then runs `cargo test --locked`. Needs root: one test starts a private journald with
# unshare, the control-socket tests call the proxy as uid 65534, and missing packages are
# installed with apt-get.
#   - systemd-journald (package systemd) and unshare (util-linux) for the journald test;
#   - dbus-send (dbus-bin), an independent D-Bus client of the control socket;
#   - openssl, which makes the TLS tests' CAs and certificates as an operator would;
#   - ip and tc (iproute2) and dnsmasq (dnsmasq-base, the program only: no service) for the fleet
#     tests' hosts made of network namespaces (harness::rig); without namespaces they skip, unless
#     MPSDEV_REQUIRE_NETNS is set;
#   - promtool, unpacked from Debian's prometheus package into target/tools (not installed,
#     which would start a Prometheus server), to lint the proxy's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /lib/systemd/systemd-journald ] || ! command -v unshare >/dev/null ||
    ! command -v dbus-send >/dev/null || ! command -v openssl >/dev/null ||
    ! command -v ip >/dev/null || ! command -v tc >/dev/null || ! command -v dnsmasq >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        systemd util-linux dbus-bin openssl iproute2 dnsmasq-base
fi
if [ -z "${PROMTOOL:-}" ]; then
    PROMTOOL="$PWD/target/tools/usr/bin/promtool"
    if [ ! -x "$PROMTOOL" ]; then
        download=$(mktemp -d)
        (cd "$download" && { apt-get download -q prometheus 2>/dev/null ||
            { apt-get update -q && apt-get download -q prometheus; }; })
        mkdir -p target/tools
        dpkg-deb -x "$download"/prometheus_*.deb target/tools
        rm -rf "$download"
    fi
    export PROMTOOL
fi

exec cargo test --locked "$@"
