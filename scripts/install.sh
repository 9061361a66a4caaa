#!/bin/sh
# Install vhdfs system-wide, independent of this checkout: delete the checkout afterwards and
# mount(8), fstab lines and the systemd unit keep working. Run as root; running it again
# updates the installation from this checkout. scripts/uninstall.sh removes it again.
#
#   VHDFS_HOME   (/opt/vhdfs)  a virtualenv holding vhdfs (not editable) and its dependencies
#   PREFIX       (/usr/local)  PREFIX/bin/vhdfs and PREFIX/bin/vhd (links into VHDFS_HOME),
#                              the manual pages, bash completion and, in
#                              PREFIX/lib/systemd/system, the unit vhdfs@.service
#   SYSTEMD_UNIT_DIR (PREFIX/lib/systemd/system)
#
# mount.fuse3 finds `vhdfs` on root's standard PATH, so keep PREFIX=/usr/local for a real
# installation. What was installed is listed in VHDFS_HOME/install-manifest, which
# uninstall.sh follows.
set -eu
umask 022  # everyone runs the installed programs and reads their pages
cd "$(dirname "$0")/.."
SOURCE=$PWD

VHDFS_HOME=${VHDFS_HOME:-/opt/vhdfs}
PREFIX=${PREFIX:-/usr/local}
SYSTEMD_UNIT_DIR=${SYSTEMD_UNIT_DIR:-$PREFIX/lib/systemd/system}
MANIFEST=$VHDFS_HOME/install-manifest

case $VHDFS_HOME$PREFIX$SYSTEMD_UNIT_DIR in *"
"*) echo "install: paths must not contain newlines" >&2; exit 2 ;; esac
for path in "$VHDFS_HOME" "$PREFIX" "$SYSTEMD_UNIT_DIR"; do
    case $path in /*) ;; *) echo "install: $path: an absolute path is needed" >&2; exit 2 ;; esac
done
if [ -e "$VHDFS_HOME" ] && [ ! -f "$MANIFEST" ] && [ -n "$(ls -A "$VHDFS_HOME")" ]; then
    echo "install: $VHDFS_HOME exists and is not a vhdfs installation; not touching it" >&2
    exit 1
fi

# What the virtualenv and pyfuse3's build need (pyfuse3 compiles against libfuse3 when pip
# has no wheel of it), installed only when missing, as scripts/setup.sh does.
if command -v dpkg-query >/dev/null 2>&1; then
    . scripts/apt-missing.sh
    apt_install_missing install fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
fi

# The new manifest is written beside the old one and replaces it at the end. Directories an
# earlier run created stay listed, so that uninstall.sh removes them.
created=""
parent=$(dirname "$VHDFS_HOME")
while [ ! -d "$parent" ]; do
    created="$created$parent
"
    parent=$(dirname "$parent")
done
mkdir -p "$VHDFS_HOME"
NEW_MANIFEST=$MANIFEST.new
: >"$NEW_MANIFEST"
if [ -f "$MANIFEST" ]; then
    grep '^dir ' "$MANIFEST" >>"$NEW_MANIFEST" || true
fi
printf '%s' "$created" | while IFS= read -r dir; do
    echo "dir - $dir" >>"$NEW_MANIFEST"
done

# Create a directory and every missing parent, recording the ones created.
make_dir() {
    [ -d "$1" ] && return 0
    make_dir "$(dirname "$1")"
    mkdir "$1"
    grep -qxF "dir - $1" "$NEW_MANIFEST" || echo "dir - $1" >>"$NEW_MANIFEST"
}

# Install file $1 as $2 with mode $3.
put_file() {
    make_dir "$(dirname "$2")"
    install -m "$3" "$1" "$2"
    echo "file $(sha256sum <"$2" | cut -d' ' -f1) $2" >>"$NEW_MANIFEST"
}

# Link $2 to $1; refuses to replace anything but a symbolic link.
put_link() {
    make_dir "$(dirname "$2")"
    if [ -e "$2" ] && [ ! -L "$2" ]; then
        echo "install: $2 exists and is not a link; remove it first" >&2
        exit 1
    fi
    ln -sfn "$1" "$2"
    echo "link - $2" >>"$NEW_MANIFEST"
}

# The virtualenv, and vhdfs built from a copy of the sources (a build in the checkout would
# leave build/ and egg-info there).
if [ ! -x "$VHDFS_HOME/bin/python" ]; then
    /usr/bin/python3 -m venv "$VHDFS_HOME"
fi
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
cp -r pyproject.toml README.md vhdfs "$BUILD/"
find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
"$VHDFS_HOME/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
    --force-reinstall --no-deps "$BUILD" >&2
# Its dependencies at the versions the test suite ran with (constraints.txt).
"$VHDFS_HOME/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
    "$BUILD" >&2
"$VHDFS_HOME/bin/vhdfs" --version >/dev/null

for program in vhdfs vhd; do
    put_link "$VHDFS_HOME/bin/$program" "$PREFIX/bin/$program"
done
for page in vhdfs vhd; do
    put_file "data/man/$page.1" "$PREFIX/share/man/man1/$page.1" 644
done
for program in vhdfs vhd; do
    put_file "data/bash-completion/$program" \
        "$PREFIX/share/bash-completion/completions/$program" 644
done
UNIT=$BUILD/vhdfs@.service
sed "s|^ExecStart=/usr/local/bin/vhdfs |ExecStart=$PREFIX/bin/vhdfs |" \
    systemd/vhdfs@.service >"$UNIT"
put_file "$UNIT" "$SYSTEMD_UNIT_DIR/vhdfs@.service" 644

mv "$NEW_MANIFEST" "$MANIFEST"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
version=$("$VHDFS_HOME/bin/vhdfs" --version)
echo "install: $version installed in $VHDFS_HOME from $SOURCE; $PREFIX/bin/vhdfs and vhd link to it"
