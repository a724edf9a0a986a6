#!/usr/bin/env bash
# Builds the qemu lab's boot files into OUTDIR: a Debian 12 root filesystem provisioned by
# provision.sh (the same script Vagrant uses), then packed as a raw ext4 disk, plus the
# kernel and initrd qemu boots directly. Only the qemu-specific parts are added here: the
# root fstab, a quiet serial line, and the unit that runs the tests the runner hands in.
#   usage: build-image.sh OUTDIR PYTHON   (PYTHON: one with pip, to fetch wheels Debian lacks)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
python=$2
root=$out/rootfs
mirror=${SNAPMGR_LAB_MIRROR:-http://deb.debian.org/debian}

step() { echo "lab: build: $*" >&2; }
unmount_all() {
    for m in dev/pts dev sys proc; do
        if mountpoint -q "$root/$m"; then umount -l "$root/$m"; fi
    done
}
trap unmount_all EXIT

mkdir -p "$out"
step "debootstrap bookworm into a chroot (about 1 minute)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# Packages must not start their services inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"

# The chroot's pip would reach PyPI without this machine's certificates and mirrors: the
# host's pip fetches the wheels and provision.sh's pip installs them from that folder.
step "fetching the wheels Debian has no package for"
"$python" -m pip download -q --only-binary=:all: -d "$root/tmp/wheels" "blake3>=0.3"

step "provision.sh: kernel, LVM, ZFS (DKMS build of zfs.ko), test tools (about 5 minutes)"
install -m 0755 "$here/provision.sh" "$root/tmp/provision.sh"
chroot "$root" env PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels /tmp/provision.sh
rm -r "$root/tmp/provision.sh" "$root/tmp/wheels" "$root/usr/sbin/policy-rc.d"

echo snapmgr-lab >"$root/etc/hostname"
echo "LABEL=snapmgr-lab / ext4 rw,errors=remount-ro 0 1" >"$root/etc/fstab"
install -m 0644 "$here/snapmgr-lab.service" "$root/etc/systemd/system/"
chroot "$root" systemctl enable --quiet snapmgr-lab.service
# A getty on the serial console would interleave its prompt with the test output.
chroot "$root" systemctl mask --quiet serial-getty@ttyS0.service
unmount_all

step "packing the root filesystem"
cp "$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)" "$out/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)" "$out/initrd.img"
mkfs.ext4 -q -L snapmgr-lab -d "$root" "$out/rootfs.img" 6G
rm -rf "$root"
