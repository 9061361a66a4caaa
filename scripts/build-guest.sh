#!/bin/sh
# Build the tiny QEMU guest the hypervisor tests boot: Debian's kernel and a busybox initramfs
# that loads the virtio, ext4 and vfat modules, runs /test.sh (appended by each test as a
# second cpio archive) and powers off. Nothing is installed system-wide: the kernel and
# busybox-static packages are only downloaded and unpacked. Idempotent: a finished build
# (.cache/guest/ready) is kept.
set -eu
cd "$(dirname "$0")/.."
guest=.cache/guest
[ -f "$guest/ready" ] && exit 0

work=$(mktemp -d)
chmod 755 "$work"  # apt-get download hands the files to its _apt user
trap 'rm -rf "$work"' EXIT
kernel_package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
(cd "$work" && apt-get download -q "$kernel_package" busybox-static >&2)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
modules=$(echo "$work"/kernel/lib/modules/*/kernel)

root="$work/root"
mkdir -p "$root/bin" "$root/mods" "$root/proc" "$root/sys" "$root/dev" "$root/mnt" "$root/tmp"
ln -s bin "$root/sbin"
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
# Load order from the kernel's modules.dep: virtio transport, the block driver, ext4 (which
# wants crc32c up front) and vfat with the code pages Debian mounts it with.
for module in drivers/virtio/virtio_ring drivers/virtio/virtio \
        drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev \
        drivers/virtio/virtio_pci drivers/block/virtio_blk lib/crc16 fs/mbcache fs/jbd2/jbd2 \
        crypto/crc32c_generic fs/ext4/ext4 fs/fat/fat fs/fat/vfat fs/nls/nls_cp437 \
        fs/nls/nls_ascii; do
    cp "$modules/$module.ko" "$root/mods/"
    echo "$(basename "$module")" >> "$root/mods/order"
done
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
for module in $(cat /mods/order); do
    insmod "/mods/$module.ko" || echo "GUEST: insmod $module failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "GUEST: begin"
if sh -e /test.sh; then echo "GUEST: rc=0"; else echo "GUEST: rc=$?"; fi
sync
poweroff -f
INIT
chmod 755 "$root/init"

mkdir -p "$guest"
cp "$work"/kernel/boot/vmlinuz-* "$guest/vmlinuz"
(cd "$root" && find . | sort | ./bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) \
    | gzip -9 > "$guest/initrd.cpio.gz"
echo "$kernel_package" > "$guest/ready"
echo "build-guest: $kernel_package and busybox in $guest" >&2
