#!/bin/bash
# tests/sysd-ct.sh: boots this machine's own systemd as PID 1 in throw-away namespaces, so that
# packages can be installed and their units run for real without touching the host.
#   tests/sysd-ct.sh start NAME       boot; returns when the manager is up
#   tests/sysd-ct.sh exec NAME CMD…   run CMD inside (all the container's namespaces, as root)
#   tests/sysd-ct.sh stop NAME        power off, wait, clean up
# SYSD_CT_BIND="/abs/dir …" binds host directories into the container at the same paths.
#
# The root file system is an overlay: the host's / read-only below, a tmpfs above, so whatever
# the container installs or writes is gone when it stops. It has its own pid, mount, network
# (loopback only), uts, ipc and cgroup namespaces; /proc/sys is read-only inside.
set -euo pipefail
cmd=${1:?usage: sysd-ct.sh start|exec|stop NAME [CMD…]}
name=${2:?container name}
shift 2
state=${SYSD_CT_DIR:-/tmp/mps-sysd-ct}/$name
cgroup=/sys/fs/cgroup/sysd-ct-$name
[ -d /sys/fs/cgroup/unified ] && cgroup=/sys/fs/cgroup/unified/sysd-ct-$name   # hybrid hierarchy

case $cmd in
start)
    mkdir -p "$state/ovl" "$state/root" "$cgroup"
    cat >"$state/init.sh" <<'INIT'
#!/bin/bash
set -eu
state=$1 root=$1/root
mount -t tmpfs -o mode=755 tmpfs "$state/ovl"
mkdir -p "$state/ovl/upper" "$state/ovl/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$state/ovl/upper,workdir=$state/ovl/work" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
if [ -e "$root/proc/sysrq-trigger" ]; then
    mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
    mount -o remount,bind,ro "$root/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
for d in null zero full random urandom tty; do
    touch "$root/dev/$d"
    mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
touch "$root/dev/console"
mount --bind "$state/console.log" "$root/dev/console"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
for p in ${SYSD_CT_BIND:-}; do
    mkdir -p "$root$p"
    mount --bind "$p" "$root$p"
done
# Units of the host image that have no business in a test container.
for u in console-getty.service getty@tty1.service systemd-timesyncd.service \
    systemd-pstore.service postgresql.service e2scrub_reap.service apt-daily.timer \
    apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer man-db.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
rm -f "$root/usr/sbin/policy-rc.d"   # would keep deb-systemd-invoke from starting units
mkdir -p "$root/oldroot"
cd "$root"
pivot_root . oldroot
umount -l /oldroot
rmdir /oldroot
exec env -i container=sysd-ct PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=multi-user.target
INIT
    chmod +x "$state/init.sh"
    : >"$state/console.log"
    export SYSD_CT_BIND
    (
        echo $BASHPID >"$cgroup/cgroup.procs"
        exec setsid unshare --pid --fork --mount --uts --ipc --net --cgroup \
            --propagation private "$state/init.sh" "$state" </dev/null >"$state/unshare.log" 2>&1
    ) &
    unshare=$!
    pid=
    for _ in $(seq 100); do
        pid=$(pgrep -P $unshare || true)
        [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = systemd ] && break
        pid=
        sleep 0.1
    done
    if [ -z "$pid" ]; then
        echo "sysd-ct: systemd did not boot:" >&2
        cat "$state/unshare.log" >&2
        exit 1
    fi
    echo "$pid" >"$state/pid"
    for _ in $(seq 300); do
        s=$(nsenter -t "$pid" -a systemctl is-system-running 2>/dev/null || true)
        case $s in running | degraded) break ;; esac
        sleep 0.1
    done
    case $s in
    running | degraded) ;;
    *)
        echo "sysd-ct: $name did not finish booting in 30 s (system '$s')" >&2
        exit 1
        ;;
    esac
    echo "sysd-ct: $name booted (systemd pid $pid on the host, system $s)" >&2
    ;;
exec)
    exec nsenter -t "$(cat "$state/pid")" -a "$@"
    ;;
stop)
    [ -f "$state/pid" ] || exit 0
    pid=$(cat "$state/pid")
    nsenter -t "$pid" -a systemctl poweroff 2>/dev/null || kill -s SIGRTMIN+4 "$pid" || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
    rm -rf "$state"
    ;;
*)
    echo "sysd-ct: unknown command $cmd (start, exec, stop)" >&2
    exit 2
    ;;
esac
