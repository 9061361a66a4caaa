#!/bin/sh
# Install everything vhdfs needs on Debian 12, idempotently: system packages (only the missing
# ones, so a second run does not touch apt), a virtualenv in .venv and the package itself.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv qemu-utils
libvhdi-utils e2fsprogs dosfstools mtools fdisk util-linux mount xz-utils fio systemd
man-db bash-completion qemu-system-x86"
[ -n "${VHDFS_EXTRA_PACKAGES:-}" ] && PACKAGES="$PACKAGES $VHDFS_EXTRA_PACKAGES"

. scripts/apt-missing.sh
# shellcheck disable=SC2086
apt_install_missing setup $PACKAGES

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
# Pinned (constraints.txt): the suite's tools change only when the repository says so.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" >&2

# On root's standard PATH: mount.fuse3 (mount, fstab, systemd .mount units) starts `vhdfs` with
# a fixed PATH, and the systemd unit calls /usr/local/bin/vhdfs. These links, the manual pages
# and the completion point into this checkout, for development. A system-wide installation
# (scripts/install.sh: /usr/local/bin/vhdfs links into a virtualenv holding an install-manifest)
# keeps them: it is left alone, and mount(8) and systemd go on running the installed copy.
installed=""
if [ -L /usr/local/bin/vhdfs ]; then
    home=$(dirname "$(dirname "$(readlink /usr/local/bin/vhdfs)")")
    [ -f "$home/install-manifest" ] && installed=$home
fi
if [ "$(id -u)" = 0 ] && [ -n "$installed" ]; then
    echo "setup: vhdfs is installed system-wide in $installed (scripts/install.sh);" \
        "/usr/local/bin/vhdfs and vhd, the manual pages and completion stay that copy's" >&2
elif [ "$(id -u)" = 0 ]; then
    for program in vhdfs vhd; do
        ln -sfn "$PWD/.venv/bin/$program" "/usr/local/bin/$program"
    done
    # Manual pages and bash completion, where man(1) and bash-completion look for local
    # additions.
    install -D -m 644 -t /usr/local/share/man/man1 data/man/vhdfs.1 data/man/vhd.1
    install -D -m 644 -t /usr/local/share/bash-completion/completions \
        data/bash-completion/vhd data/bash-completion/vhdfs
fi

# The QEMU guest of the hypervisor tests (kernel and initramfs, built once into .cache/guest).
scripts/build-guest.sh
