#!/bin/bash
# journald.sh OUT CMD...: runs CMD beside a real systemd-journald and writes the journal, as JSON
# lines, to OUT when CMD has exited. A private mount namespace gives journald its own /run, so the
# host's journal (if any) is untouched. CMD's stdout and stderr are a journal stream and
# JOURNAL_STREAM names it, exactly as systemd sets it up for a service.
set -eu
exec unshare --mount --propagation private /bin/bash -c '
set -eu
out=$1; shift
mount -t tmpfs -o mode=755 tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
mount --bind /dev/null /dev/kmsg
mkdir -p /run/systemd/journal
env -u NOTIFY_SOCKET -u WATCHDOG_USEC -u WATCHDOG_PID /lib/systemd/systemd-journald & journald=$!
for _ in $(seq 200); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
set +e
systemd-cat -t journald-test /bin/sh -c '"'"'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"'"'"' sh "$@"
rc=$?
journalctl --sync
journalctl --all -o json --no-pager > "$out"
kill $journald; wait $journald 2>/dev/null
exit $rc' journald.sh "$@"
