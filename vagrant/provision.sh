#!/usr/bin/env bash
# The lab guest, in one place: everything a Debian 12 machine needs to run snapmgr's lab
# tests (LVM thick and thin, ZFS through libzfs_core, btrfs, FUSE, systemd). Vagrant runs
# it on a booted box; vagrant/build-image.sh runs it inside a debootstrap chroot. Both
# must end with the same machine, so nothing here may depend on which one it is.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# ZFS lives in contrib (its licence keeps it out of main).
cat >/etc/apt/sources.list.d/snapmgr-contrib.list <<'EOF'
deb http://deb.debian.org/debian bookworm contrib
EOF
# zfs-dkms otherwise stops to show its licence notice.
echo "zfs-dkms zfs-dkms/note-incompatible-licenses note true" | debconf-set-selections

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 linux-headers-amd64 initramfs-tools systemd-sysv udev kmod dbus \
    lvm2 thin-provisioning-tools e2fsprogs xfsprogs btrfs-progs rsync fuse3 \
    zfs-dkms zfsutils-linux python3-pyzfs \
    python3 python3-click python3-pytest python3-testinfra python3-hypothesis \
    python3-pyfuse3 python3-trio python3-pip \
    >/dev/null
# Debian has no blake3 for Python; PyPI's is a binary wheel (manifests hash with it).
python3 -m pip install -q --break-system-packages --no-cache-dir "blake3>=0.3"

# DKMS builds for the running kernel; in a chroot that is the host's, so build zfs.ko for
# every kernel the guest has (a no-op where it is already built).
for kernel in /lib/modules/*; do
    dkms autoinstall -k "$(basename "$kernel")" >/dev/null
    test -e "$kernel/updates/dkms/zfs.ko" || { echo "provision: no zfs.ko for $kernel" >&2; exit 1; }
done
echo zfs >/etc/modules-load.d/zfs.conf

apt-get clean
