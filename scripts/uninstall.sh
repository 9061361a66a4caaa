#!/bin/sh
# Remove what scripts/install.sh installed, and nothing else: the files and links listed in
# VHDFS_HOME/install-manifest (each only if it is still what install.sh put there), the
# directories install.sh created (once empty), then VHDFS_HOME. Run it with the VHDFS_HOME
# that install.sh used (default /opt/vhdfs); running it again does nothing.
set -eu

VHDFS_HOME=${VHDFS_HOME:-/opt/vhdfs}
MANIFEST=$VHDFS_HOME/install-manifest

if [ ! -f "$MANIFEST" ]; then
    echo "uninstall: no vhdfs installation in $VHDFS_HOME; nothing to do" >&2
    exit 0
fi

# Daemons running from this installation would lose their code under them.
running=""
for cmdline in /proc/[0-9]*/cmdline; do
    interpreter=$(tr '\0' '\n' <"$cmdline" 2>/dev/null | head -n 1) || continue
    case $interpreter in
        "$VHDFS_HOME"/bin/python*)
            pid=${cmdline#/proc/}
            running="$running ${pid%/cmdline}"
            ;;
    esac
done
if [ -n "$running" ]; then
    echo "uninstall: vhdfs from $VHDFS_HOME still runs (PID$running): unmount first" \
        "(vhdfs -u MOUNTPOINT, systemctl stop vhdfs@...)" >&2
    exit 1
fi

while read -r kind sum path; do
    case $kind in
        link)
            if [ -L "$path" ]; then
                case $(readlink "$path") in
                    "$VHDFS_HOME"/*) rm -f "$path" ;;
                    *) echo "uninstall: $path now points elsewhere; kept" >&2 ;;
                esac
            fi
            ;;
        file)
            if [ -f "$path" ] && [ ! -L "$path" ]; then
                if [ "$(sha256sum <"$path" | cut -d' ' -f1)" = "$sum" ]; then
                    rm -f "$path"
                else
                    echo "uninstall: $path was changed since it was installed; kept" >&2
                fi
            fi
            ;;
    esac
done <"$MANIFEST"

# Then VHDFS_HOME, and the directories install.sh created, deepest first, each once empty.
dirs=$(grep '^dir - ' "$MANIFEST" | cut -c7- | sort -r) || true
rm -rf "$VHDFS_HOME"
printf '%s\n' "$dirs" | while IFS= read -r dir; do
    [ -n "$dir" ] && { rmdir "$dir" 2>/dev/null || true; }
done
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
echo "uninstall: removed the vhdfs installation in $VHDFS_HOME" >&2
