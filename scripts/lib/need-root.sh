# Sourced by the scripts that need root. `need_root WHY` returns when this process is root;
# otherwise it says how to run the script as root, both where sudo exists and where it does
# not (a root-only machine has no sudo), and exits 1.
need_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    local me
    me=$(basename "$0")
    if command -v sudo >/dev/null 2>&1; then
        echo "$me: needs root ($1); run it as root, e.g.: sudo $0 $*" >&2
    else
        echo "$me: needs root ($1); log in as root (or: su -c '$0') and run it again" >&2
    fi
    exit 1
}
