# Sourced by scripts/setup.sh and scripts/install.sh: install the Debian packages named that
# are not installed yet, and nothing else, so that a second run does not touch apt.
#   apt_install_missing NAME PACKAGE...    (NAME prefixes the message)
apt_install_missing() {
    name=$1
    shift
    missing=""
    for package in "$@"; do
        status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || missing="$missing $package"
    done
    if [ -n "$missing" ]; then
        echo "$name: installing$missing" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >&2
    fi
}
