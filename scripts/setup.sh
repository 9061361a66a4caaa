#!/bin/sh
# Install everything vhdfs needs on Debian 12, idempotently: system packages (only the missing
# ones, so a second run does not touch apt), a virtualenv in .venv and the package itself.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv qemu-utils
libvhdi-utils e2fsprogs dosfstools mtools fdisk util-linux mount xz-utils fio systemd
man-db bash-completion qemu-system-x86"
[ -n "${VHDFS_EXTRA_PACKAGES:-}" ] && PACKAGES="$PACKAGES $VHDFS_EXTRA_PACKAGES"

missing=""
for package in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >&2
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" >&2

# On root's standard PATH: mount.fuse3 (mount, fstab, systemd .mount units) starts `vhdfs` with
# a fixed PATH, and the systemd unit calls /usr/local/bin/vhdfs.
if [ "$(id -u)" = 0 ]; then
    for program in vhdfs vhd; do
        ln -sfn "$PWD/.venv/bin/$program" "/usr/local/bin/$program"
    done
fi

# Manual pages and bash completion, where man(1) and bash-completion look for local additions.
if [ "$(id -u)" = 0 ]; then
    install -D -m 644 -t /usr/local/share/man/man1 data/man/vhdfs.1 data/man/vhd.1
    install -D -m 644 data/bash-completion/vhd /usr/local/share/bash-completion/completions/vhd
fi

# The QEMU guest of the hypervisor tests (kernel and initramfs, built once into .cache/guest).
scripts/build-guest.sh
