#!/bin/bash
# Install edge-gateway on Raspberry Pi OS / Debian (bookworm or later).
#
#   sudo systemd/install.sh --provisioning-pubkey prov.pub [--gateway-id gw-0001]
#
# Idempotent: a second run with the same inputs changes nothing and says so.
# --root DIR installs into a directory tree instead of / (image builds, tests);
# --dry-run prints what would change and changes nothing.
set -euo pipefail

usage() {
    cat <<USAGE
usage: install.sh [--root DIR] [--dry-run] [--source DIR] [--no-venv] [--python PY]
                  [--provisioning-pubkey FILE] [--gateway-id ID] [--pip-args ARGS]
  --root DIR                 install below DIR instead of / (no service is started)
  --dry-run                  print what would change, change nothing
  --source DIR               project source tree (default: this script's repository)
  --no-venv                  do not create/update the virtualenv in /opt/edgegw/venv
  --python PY                interpreter for the virtualenv (default: python3)
  --provisioning-pubkey FILE provisioning role public key (PEM) -> /etc/edgegw/provisioning.pub
  --gateway-id ID            create the device keystore for ID if there is none
  --pip-args ARGS            extra arguments for pip install (e.g. a local wheelhouse)
USAGE
}

ROOT=""
DRY=0
SRC="$(cd "$(dirname "$0")/.." && pwd)"
VENV=1
PYTHON=python3
PUBKEY=""
GWID=""
PIP_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --source) SRC="$(realpath "$2")"; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --python) PYTHON="$2"; shift 2 ;;
        --provisioning-pubkey) PUBKEY="$(realpath "$2")"; shift 2 ;;
        --gateway-id) GWID="$2"; shift 2 ;;
        --pip-args) PIP_ARGS="$2"; shift 2 ;;
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
    say "would create /var/lib/edgegw, /var/lib/edgegw/provisioning (0700 edgegw) and /etc/edgegw"
    CHANGES=$((CHANGES + 1))
else
    dirs_ok() {
        local uid
        uid="$(awk -F: '$1=="edgegw"{print $3}' "$(P /etc/passwd)")"
        for d in /var/lib/edgegw /var/lib/edgegw/provisioning; do
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

# Virtualenv with the project, rebuilt only when the source changed.
if [ "$VENV" = 1 ]; then
    stamp="$(cd "$SRC" && find pyproject.toml gateway firmware_bridge store_forward provisioning \
        -type f \( -name '*.py' -o -name '*.toml' -o -name '*.json' \) -print0 2>/dev/null \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
    venv="$(P /opt/edgegw/venv)"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$(P /opt/edgegw/source.sha256)" 2>/dev/null)" != "$stamp" ]; then
        if [ ! -x "$venv/bin/python" ]; then
            change "create virtualenv /opt/edgegw/venv" "$PYTHON" -m venv "$venv"
        fi
        # shellcheck disable=SC2086
        change "install edge-gateway into /opt/edgegw/venv" \
            "$venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$SRC"
        if [ "$DRY" = 0 ]; then printf '%s\n' "$stamp" > "$(P /opt/edgegw/source.sha256)"; fi
    fi
fi

# Device keystore (never overwritten).
if [ -n "$GWID" ] && [ ! -f "$(P /var/lib/edgegw/keys/manifest.json)" ]; then
    if [ -n "$ROOT" ]; then
        say "note: keystore for $GWID not created under --root; run on the device:" \
            "runuser -u edgegw -- /opt/edgegw/venv/bin/edgegw keys init --dir /var/lib/edgegw/keys --gateway-id $GWID"
    else
        change "create device keystore for $GWID" runuser -u edgegw -- \
            /opt/edgegw/venv/bin/edgegw keys init --dir /var/lib/edgegw/keys --gateway-id "$GWID"
    fi
fi

# Enable the daemon (a symlink in multi-user.target.wants; offline with --root).
if [ ! -L "$(P /etc/systemd/system/multi-user.target.wants/edgegw.service)" ]; then
    if [ -n "$ROOT" ]; then
        change "enable edgegw.service" systemctl --root="$ROOT" --quiet enable edgegw.service
    else
        change "enable edgegw.service" systemctl --quiet enable edgegw.service
    fi
fi

if [ "$CHANGES" = 0 ]; then
    say "nothing to do: already installed"
    exit 0
fi
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    command -v udevadm >/dev/null && udevadm control --reload-rules || true
    # Starts only once a configuration exists (ConditionPathExists in the unit).
    systemctl try-restart edgegw.service || true
fi
if [ "$DRY" = 1 ]; then say "$CHANGES change(s) would be made"; else say "$CHANGES change(s) made"; fi
