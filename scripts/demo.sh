#!/bin/sh
# The main job on a sample: make a small dynamic VHD holding a partition table and an ext4 file
# system with a file in it, mount it with vhdfs, loop-mount the partition, print the file, and
# unmount everything. Run as root.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/vhdfs-demo.XXXXXX)
loop=""
cleanup() {
    mountpoint -q "$work/guest" && umount "$work/guest"
    [ -n "$loop" ] && losetup -d "$loop"
    mountpoint -q "$work/disk" && fusermount3 -u "$work/disk"
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/content" "$work/disk" "$work/guest"

step() { printf '\n== %s\n' "$*"; }

step "building sample.vhd: an MBR partition table and an ext4 partition holding hello.txt"
echo "Hello from inside a VHD, served by vhdfs." > "$work/content/hello.txt"
truncate -s 64M "$work/sample.raw"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$work/sample.raw"
mkfs.ext4 -q -L sample -E offset=1048576 -d "$work/content" "$work/sample.raw" 63M
qemu-img convert -f raw -O vpc -o subformat=dynamic "$work/sample.raw" "$work/sample.vhd"
rm "$work/sample.raw"
vhd info "$work/sample.vhd"

step "vhdfs $work/sample.vhd $work/disk"
vhdfs "$work/sample.vhd" "$work/disk"
ls -l "$work/disk"

step "losetup -r -P on the raw disk, mount its first partition"
loop=$(losetup -r -P --show -f "$work/disk/sample.raw")
# Kernels built without MBR/GPT parsing (some VMs) find no partitions; partx adds them from
# user space. Where the kernel already did, partx reports them busy, which is fine.
partx -a "$loop" 2>/dev/null || true
mount -o ro "${loop}p1" "$work/guest"
blkid "${loop}p1"

step "cat hello.txt from the guest file system"
cat "$work/guest/hello.txt"

step "unmounting"
umount "$work/guest"
losetup -d "$loop"
loop=""
fusermount3 -u "$work/disk"
echo "done"
