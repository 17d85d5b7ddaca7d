#!/bin/bash
# Install edge-gateway on Raspberry Pi OS / Debian (bookworm or later).
#
#   sudo systemd/install.sh --wheelhouse DIR --provisioning-pubkey prov.pub [--gateway-id gw-0001]
#
# The software is installed from a local wheelhouse with no network: DIR holds
# the project's wheel and the wheels requirements.lock pins (pip's among them);
# pip runs from its wheel there with --no-index --require-hashes, so every
# gateway runs exactly the locked dependency set. The release goes to
# /opt/edgegw/releases/VERSION, and /opt/edgegw/current and committed name it
# (later releases come as signed software bundles: docs/operations.md).
# `edgegw release verify BUNDLE --pubkey KEY --extract DIR` makes DIR from a
# signed bundle; `./dev wheelhouse DIR` from a source tree.
#
# Idempotent: a second run with the same inputs changes nothing and says so.
# --root DIR installs into a directory tree instead of / (tests; the release's
# scripts then name their interpreter under DIR); --dry-run prints what would
# change and changes nothing.
set -euo pipefail

usage() {
    cat <<USAGE
usage: install.sh [--root DIR] [--dry-run] [--source DIR] [--wheelhouse DIR] [--no-venv]
                  [--python PY] [--provisioning-pubkey FILE] [--gateway-id ID]
  --root DIR                 install below DIR instead of / (no service is started)
  --dry-run                  print what would change, change nothing
  --source DIR               project source tree (default: this script's repository)
  --wheelhouse DIR           the project's wheel and the locked wheels (no network is used)
  --no-venv                  do not install a release into /opt/edgegw/releases
  --python PY                interpreter for the release's virtualenv (default: python3)
  --provisioning-pubkey FILE provisioning role public key (PEM) -> /etc/edgegw/provisioning.pub
  --gateway-id ID            create the device keystore for ID if there is none
USAGE
}

ROOT=""
DRY=0
SRC="$(cd "$(dirname "$0")/.." && pwd)"
VENV=1
PYTHON=python3
PUBKEY=""
GWID=""
WHEELHOUSE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --source) SRC="$(realpath "$2")"; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --python) PYTHON="$2"; shift 2 ;;
        --provisioning-pubkey) PUBKEY="$(realpath "$2")"; shift 2 ;;
        --gateway-id) GWID="$2"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="$(realpath "$2")"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: must run as root (or use --root DIR / --dry-run)" >&2
    exit 2
fi
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/systemd" ] || {
    echo "install.sh: $SRC is not the edge-gateway source tree" >&2; exit 2; }

if [ -n "$PUBKEY" ] && ! grep -q "BEGIN PUBLIC KEY" "$PUBKEY" 2>/dev/null; then
    echo "install.sh: $PUBKEY is not a PEM public key" >&2
    exit 2
fi

if [ "$VENV" = 1 ]; then
    [ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE" ] || {
        echo "install.sh: --wheelhouse DIR is required to install the software (or --no-venv)" >&2
        exit 2; }
    shopt -s nullglob
    project_wheels=("$WHEELHOUSE"/edge_gateway-*.whl)
    pip_wheels=("$WHEELHOUSE"/pip-*.whl)
    shopt -u nullglob
    [ "${#project_wheels[@]}" = 1 ] || {
        echo "install.sh: $WHEELHOUSE must hold exactly one edge_gateway-*.whl (found ${#project_wheels[@]})" >&2
        exit 2; }
    [ "${#pip_wheels[@]}" -ge 1 ] || {
        echo "install.sh: $WHEELHOUSE holds no pip wheel (requirements.lock pins one)" >&2; exit 2; }
    LOCK="$WHEELHOUSE/requirements.lock"
    [ -f "$LOCK" ] || LOCK="$SRC/requirements.lock"
    [ -f "$LOCK" ] || { echo "install.sh: no requirements.lock in $WHEELHOUSE or $SRC" >&2; exit 2; }
    PROJECT_WHEEL="${project_wheels[0]}"
    VERSION="$(basename "$PROJECT_WHEEL" | cut -d- -f2)"
fi

CHANGES=0
say() { echo "install.sh: $*"; }
change() {  # change DESCRIPTION COMMAND...
    local what="$1"; shift
    CHANGES=$((CHANGES + 1))
    if [ "$DRY" = 1 ]; then say "would $what"; else say "$what"; "$@"; fi
}
P() { printf '%s%s' "$ROOT" "$1"; }

# install_file SRC DEST MODE: copy only when content or mode differ.
install_file() {
    local src="$1" dest mode="$3"
    dest="$(P "$2")"
    if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$src" "$dest" \
        && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        return 0
    fi
    change "install $2 (mode $mode)" install -D -m "$mode" "${OWNER[@]}" "$src" "$dest"
}

S="$SRC/systemd"
OWNER=()
[ "$(id -u)" = 0 ] && OWNER=(-o 0 -g 0)
install_file "$S/edgegw.sysusers" /usr/lib/sysusers.d/edgegw.conf 0644
install_file "$S/edgegw.tmpfiles" /usr/lib/tmpfiles.d/edgegw.conf 0644
install_file "$S/edgegw.service" /etc/systemd/system/edgegw.service 0644
install_file "$S/edgegw-usb@.service" /etc/systemd/system/edgegw-usb@.service 0644
install_file "$S/99-edgegw-usb.rules" /etc/udev/rules.d/99-edgegw-usb.rules 0644
install_file "$S/edgegw-update.path" /etc/systemd/system/edgegw-update.path 0644
install_file "$S/edgegw-update.service" /etc/systemd/system/edgegw-update.service 0644
install_file "$S/edgegw-update-recover.service" /etc/systemd/system/edgegw-update-recover.service 0644
install_file "$S/60-edgegw-writeback.conf" /etc/sysctl.d/60-edgegw-writeback.conf 0644

# Service user (systemd-sysusers is idempotent; run it only when something is missing).
user_ok() {
    grep -q '^edgegw:' "$(P /etc/passwd)" 2>/dev/null \
        && grep -Eq '^dialout:[^:]*:[^:]*:(.*,)?edgegw(,.*)?$' "$(P /etc/group)" 2>/dev/null
}
if ! user_ok; then
    if [ -n "$ROOT" ]; then
        change "create user edgegw (member of dialout)" \
            systemd-sysusers --root="$ROOT" "$S/edgegw.sysusers"
    else
        change "create user edgegw (member of dialout)" systemd-sysusers "$S/edgegw.sysusers"
    fi
fi

# Directories, owners and modes.
if [ "$DRY" = 1 ] && ! user_ok; then
    say "would create /var/lib/edgegw, its provisioning and updates (0700 edgegw), /etc/edgegw and /opt/edgegw"
    CHANGES=$((CHANGES + 1))
else
    dirs_ok() {
        local uid
        uid="$(awk -F: '$1=="edgegw"{print $3}' "$(P /etc/passwd)")"
        for d in /var/lib/edgegw /var/lib/edgegw/provisioning /var/lib/edgegw/updates; do
            [ -d "$(P "$d")" ] && [ "$(stat -c '%a %u' "$(P "$d")")" = "700 $uid" ] || return 1
        done
        [ -d "$(P /etc/edgegw)" ] && [ "$(stat -c '%a %u' "$(P /etc/edgegw)")" = "755 0" ]
    }
    if ! dirs_ok; then
        tmpfiles_root=()
        [ -n "$ROOT" ] && tmpfiles_root=(--root="$ROOT")
        change "create state and configuration directories" \
            systemd-tmpfiles "${tmpfiles_root[@]}" --create "$S/edgegw.tmpfiles"
    fi
fi

if [ -n "$PUBKEY" ]; then
    install_file "$PUBKEY" /etc/edgegw/provisioning.pub 0644
elif [ ! -f "$(P /etc/edgegw/provisioning.pub)" ]; then
    say "warning: no provisioning key installed; USB bundles will be refused until" \
        "/etc/edgegw/provisioning.pub exists (--provisioning-pubkey FILE)"
fi

# The release: a virtualenv made from the wheelhouse alone, then the links.
install_release() {  # install_release DIR
    local rel="$1" req
    rm -rf "$rel"
    "$PYTHON" -m venv --without-pip "$rel"
    req="$(mktemp)"
    cp "$LOCK" "$req"
    printf '\nedge-gateway==%s --hash=sha256:%s\n' "$VERSION" \
        "$(sha256sum "$PROJECT_WHEEL" | cut -d' ' -f1)" >> "$req"
    # --isolated: no pip configuration or PIP_* variable can add an index.
    env PIP_CONFIG_FILE=/dev/null "$rel/bin/python" "${pip_wheels[-1]}/pip" install --isolated \
        --no-index --find-links "$WHEELHOUSE" --require-hashes --only-binary :all: \
        --no-cache-dir --disable-pip-version-check --quiet -r "$req"
    rm -f "$req"
    sync
    printf '{"digest": null, "installed_at": "%s", "min_version": "%s", "version": "%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$VERSION" "$VERSION" > "$rel/edgegw-release.json.tmp"
    sync
    mv "$rel/edgegw-release.json.tmp" "$rel/edgegw-release.json"
}
point() {  # point LINK VERSION: atomic symlink swap
    ln -sfn "releases/$2" "$(P "/opt/edgegw/$1.tmp")"
    mv -T "$(P "/opt/edgegw/$1.tmp")" "$(P "/opt/edgegw/$1")"
}
if [ "$VENV" = 1 ]; then
    rel="$(P "/opt/edgegw/releases/$VERSION")"
    if [ ! -f "$rel/edgegw-release.json" ]; then
        [ "$DRY" = 1 ] || mkdir -p "$(P /opt/edgegw/releases)"
        change "install release $VERSION into /opt/edgegw/releases/$VERSION (from $WHEELHOUSE, no network)" \
            install_release "$rel"
    fi
    for link in current committed; do
        if [ "$(readlink "$(P "/opt/edgegw/$link")" 2>/dev/null)" != "releases/$VERSION" ]; then
            change "point /opt/edgegw/$link at releases/$VERSION" point "$link" "$VERSION"
        fi
    done
fi

# Device keystore (never overwritten).
if [ -n "$GWID" ] && [ ! -f "$(P /var/lib/edgegw/keys/manifest.json)" ]; then
    if [ -n "$ROOT" ]; then
        say "note: keystore for $GWID not created under --root; run on the device:" \
            "runuser -u edgegw -- /opt/edgegw/current/bin/edgegw keys init --dir /var/lib/edgegw/keys --gateway-id $GWID"
    else
        change "create device keystore for $GWID" runuser -u edgegw -- \
            /opt/edgegw/current/bin/edgegw keys init --dir /var/lib/edgegw/keys --gateway-id "$GWID"
    fi
fi

# Enable the daemon, the updater's path unit and the boot-time recovery
# (symlinks in multi-user.target.wants; offline with --root).
for unit in edgegw.service edgegw-update.path edgegw-update-recover.service; do
    if [ ! -L "$(P "/etc/systemd/system/multi-user.target.wants/$unit")" ]; then
        if [ -n "$ROOT" ]; then
            change "enable $unit" systemctl --root="$ROOT" --quiet enable "$unit"
        else
            change "enable $unit" systemctl --quiet enable "$unit"
        fi
    fi
done

if [ "$CHANGES" = 0 ]; then
    say "nothing to do: already installed"
    exit 0
fi
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    command -v udevadm >/dev/null && udevadm control --reload-rules || true
    # The page cache's writeback setting (60-edgegw-writeback.conf) takes effect now.
    command -v sysctl >/dev/null && sysctl -q --load /etc/sysctl.d/60-edgegw-writeback.conf || true
    # Starts only once a configuration exists (ConditionPathExists in the unit).
    systemctl try-restart edgegw.service || true
fi
if [ "$DRY" = 1 ]; then say "$CHANGES change(s) would be made"; else say "$CHANGES change(s) made"; fi
