#!/bin/sh
# The main job on a sample: create a small dynamic VHD, mount it with vhdfs, put a partition
# table and an ext4 file system with a file in it, unmount everything; then mount the image
# again read-only, loop-mount the partition, print the file, check the image, and unmount.
# Run as root.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/vhdfs-demo.XXXXXX)
loop=""
cleanup() {
    if mountpoint -q "$work/guest"; then umount "$work/guest"; fi
    if [ -n "$loop" ]; then losetup -d "$loop"; fi
    if mountpoint -q "$work/disk"; then fusermount3 -u "$work/disk"; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/disk" "$work/guest"

step() { printf '\n== %s\n' "$*"; }

# Kernels built without MBR/GPT parsing (some VMs) find no partitions after losetup -P;
# partx adds them from user space. Where the kernel already did, partx reports them busy.
attach() {
    loop=$(losetup "$@" -P --show -f "$work/disk/sample.raw")
    partx -a "$loop" 2>/dev/null || true
}

step "vhd create sample.vhd 64M"
vhd create "$work/sample.vhd" 64M

step "vhdfs sample.vhd disk/    (read-write)"
vhdfs "$work/sample.vhd" "$work/disk"
ls -l "$work/disk"

step "a partition table and an ext4 file system holding hello.txt, written through vhdfs"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$work/disk/sample.raw"
attach
mkfs.ext4 -q -L sample "${loop}p1"
mount "${loop}p1" "$work/guest"
echo "Hello from inside a VHD, written and read by vhdfs." > "$work/guest/hello.txt"
umount "$work/guest"
losetup -d "$loop"
loop=""
fusermount3 -u "$work/disk"
vhd info "$work/sample.vhd"

step "mounted again read-only, the partition loop-mounted: cat hello.txt"
vhdfs -o ro,pidfile="$work/vhdfs.pid" "$work/sample.vhd" "$work/disk"
attach -r
mount -o ro "${loop}p1" "$work/guest"
cat "$work/guest/hello.txt"

step "unmounting, then vhd check"
umount "$work/guest"
losetup -d "$loop"
loop=""
# After the unmount the daemon writes out what is left and exits, releasing the image;
# -o pidfile= told us its PID.
pid=$(cat "$work/vhdfs.pid")
fusermount3 -u "$work/disk"
exited() { ! [ -e "/proc/$1" ] || grep -q '^State:.*zombie' "/proc/$1/status"; }
until exited "$pid"; do sleep 0.1; done
vhd check "$work/sample.vhd"
echo "done"
