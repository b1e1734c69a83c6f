#!/bin/sh
# Runs as PID 1 of fresh mount/pid/uts/net/cgroup namespaces (started by `unshare --fork`) and
# turns them into a throwaway systemd host. $1 is the sandbox's work directory (on the host); the
# other arguments are host directories to show inside, read-only, under /run/ipcluster-sandbox/host
# (the build to install). Every other path below is fixed; the arguments are used quoted, never
# evaluated.
set -eu
work=$1
shift
# The work directory is the current directory from here on, and is only ever named relatively:
# the mounts below may cover the path it has on the host (a checkout under /tmp, or /run).
cd "$work"
# Nothing mounted below may propagate back to the host.
mount --make-rprivate /
mount -t tmpfs -o mode=755 tmpfs /run
# The build, bound before /tmp is covered (a checkout under /tmp stays reachable), and never inside
# the sandbox's /tmp: systemd-tmpfiles empties that at boot.
for dir in "$@"; do
    mkdir -p "/run/ipcluster-sandbox/host$dir"
    mount --bind -o ro "$dir" "/run/ipcluster-sandbox/host$dir"
done
# Writable copies of /etc /usr /var whose changes land in the work directory, not on the host.
for d in etc usr var; do
    mkdir -p "$d.upper" "$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$d.upper,workdir=$d.work" "/$d"
done
# A private /tmp is vital: systemd-tmpfiles would otherwise clean the host's /tmp.
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /var/log/journal
mount -t tmpfs -o mode=2755 tmpfs /var/log/journal
mount -t proc proc /proc
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# bpffs, as systemd mounts it at boot on a host (in a container it leaves it alone). A fresh
# instance: pins made in the sandbox never reach the host's.
mount -t bpf -o mode=700 bpf /sys/fs/bpf
ip link set lo up
echo ipcluster-sandbox > /etc/hostname
hostname ipcluster-sandbox
# Units that make no sense in a sandbox, or that would reach out of it: consoles, the clock,
# kernel-global sysctls and binfmt registrations, periodic maintenance of the host's disks.
for u in getty@.service console-getty.service serial-getty@.service container-getty@.service \
         systemd-timesyncd.service systemd-sysctl.service systemd-binfmt.service \
         proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount systemd-modules-load.service \
         systemd-pstore.service e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer man-db.timer \
         systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "/etc/systemd/system/$u"
done
# Boot into a target that starts the basics and the system bus, and none of the host's services.
cat > /etc/systemd/system/ipcluster-sandbox.target <<'UNIT'
[Unit]
Description=ipcluster sandbox
Requires=basic.target dbus.socket
After=basic.target dbus.socket
AllowIsolate=yes
UNIT
export container=other
exec /lib/systemd/systemd --unit=ipcluster-sandbox.target </dev/null >console.log 2>&1
