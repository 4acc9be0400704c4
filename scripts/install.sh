#!/usr/bin/env bash
# Installs edge-agent as a hardened systemd service. Idempotent: run it again after `git pull`
# to update; it never overwrites a file under /etc/edge-agent.
#
#   sudo scripts/install.sh [--prefix DIR] [--system-site-packages | --venv-from VENV | --no-venv]
#   sudo scripts/install.sh --uninstall [--prefix DIR]
#
# What it does:
#   DIR/venv (default /opt/edge-agent/venv)  a venv with this checkout pip-installed into it
#   user and group edge-agent                system account, also in the groups video and render
#   /etc/edge-agent/agent.toml               from config/agent.example.toml, if missing
#   /etc/edge-agent/conf.d/                  drop-in settings files (name order, later wins)
#   /etc/edge-agent/credentials/ (0700)      mqtt-password, mqtt-tls.key: LoadCredential= files
#   /var/lib/edge-agent/models/              model folders (model.path)
#   /etc/systemd/system/edge-agent.service   enabled, not started: edit agent.toml first
#   .../edge-agent.service.d/jetson.conf     on a Jetson: its GPU device nodes
#
# Options:
#   --prefix DIR              where the venv goes (default /opt/edge-agent)
#   --system-site-packages    the venv sees the system's packages: JetPack's CUDA build of
#                             onnxruntime-genai, installed system-wide
#   --venv-from VENV          no pip: DIR/venv becomes a link to VENV, an existing venv that
#                             has edge-agent installed (built elsewhere, or a development one)
#   --no-venv                 skip the venv and pip (edge-agent is installed some other way)
#   --uninstall               remove the service, the venv and DIR; keeps /etc/edge-agent,
#                             /var/lib/edge-agent (models) and the edge-agent user
# Environment:
#   DESTDIR                   install into this staging root instead of /: users, groups and
#                             systemctl are only printed, not done
#   PYTHON                    interpreter for the venv (default python3; 3.10 or newer)
#   EDGE_AGENT_PIP_ARGS       more pip arguments, e.g. "--no-index --find-links /media/wheels"
#                             for an offline box, or "onnxruntime-genai-cuda" for a CUDA build
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UNIT_NAME=edge-agent.service
SERVICE_USER=edge-agent
MARKER=.installed-by-edge-agent

PREFIX=/opt/edge-agent
DESTDIR="${DESTDIR:-}"
PYTHON="${PYTHON:-python3}"
HOST_ROOT="${EDGE_AGENT_HOST_ROOT:-}"  # where to look for Jetson devices (tests only)
UNINSTALL=0
VENV=1
VENV_FROM=""
VENV_ARGS=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
say() { echo "install: $*" >&2; }
die() { say "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --system-site-packages) VENV_ARGS+=(--system-site-packages); shift ;;
        --venv-from) [ $# -ge 2 ] || die "--venv-from needs a venv"; VENV_FROM="$2"; shift 2 ;;
        --venv-from=*) VENV_FROM="${1#--venv-from=}"; shift ;;
        --no-venv) VENV=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path (got $PREFIX)" ;;
esac
PREFIX="${PREFIX%/}"
case "$PREFIX" in  # uninstall removes it: refuse the places that are not ours to remove
    ""|/usr|/usr/local|/opt|/etc|/var|/var/lib|/home|/root|/bin|/sbin|/lib)
        die "refusing --prefix $PREFIX: give edge-agent a directory of its own" ;;
esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or set DESTDIR to install into a staging root"
fi

ROOT="${DESTDIR%/}"
ETC="$ROOT/etc/edge-agent"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV_DIR="$ROOT$PREFIX/venv"
STATE="$ROOT/var/lib/edge-agent"

STAGE=""
trap '[ -z "$STAGE" ] || rm -rf "$STAGE"' EXIT

# systemctl on the real system; with DESTDIR, or where systemd is not running (a container,
# an image being built), it only says what it would run.
systemctl_do() {
    if [ -n "$DESTDIR" ]; then
        say "DESTDIR set, not running: systemctl $*"
    elif [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
        say "systemd is not running here, not running: systemctl $*"
    else
        systemctl "$@"
    fi
}

# Writes stdin to $1 only when the content differs (so a second run changes nothing).
put() {
    local target="$1" mode="$2" tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        return 0
    fi
    install -D -m "$mode" "$tmp" "$target"
    rm -f "$tmp"
    say "wrote $target"
}

# Creates a directory with a mode, leaving an existing one alone.
dir() {
    [ -d "$1" ] || { install -d -m "$2" "$1"; say "created $1"; }
}

# --- venv -------------------------------------------------------------------------------------
install_venv() {
    local fingerprint
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is older than 3.10 (set PYTHON=python3.10 or newer)"
    # Build from a copy: pip builds in the source folder, and the checkout stays clean.
    STAGE="$(mktemp -d)"
    cp -R "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/edge_agent" "$STAGE/"
    mkdir -p "$STAGE/models" && cp "$REPO/models/catalog.toml" "$STAGE/models/"  # a data file of the wheel
    find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
    fingerprint="$(cd "$STAGE" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
    fingerprint="$fingerprint ${EDGE_AGENT_PIP_ARGS:-} ${VENV_ARGS[*]:-}"
    if [ -x "$VENV_DIR/bin/edge-agent" ] && [ "$(cat "$VENV_DIR/.edge-agent-source" 2>/dev/null)" = "$fingerprint" ]; then
        say "venv $VENV_DIR is up to date"
        return 0
    fi
    if [ -L "$VENV_DIR" ]; then  # left by --venv-from: pip must not write into its target
        rm -f "$VENV_DIR"
    fi
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        say "creating venv $VENV_DIR"
        "$PYTHON" -m venv ${VENV_ARGS[@]+"${VENV_ARGS[@]}"} "$VENV_DIR"
    fi
    say "installing edge-agent into $VENV_DIR"
    # shellcheck disable=SC2086 # EDGE_AGENT_PIP_ARGS is a list of words on purpose
    "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${EDGE_AGENT_PIP_ARGS:-} "$STAGE"
    "$VENV_DIR/bin/edge-agent" --version >/dev/null || die "the installed edge-agent does not run"
    echo "$fingerprint" >"$VENV_DIR/.edge-agent-source"
}

link_venv() {
    "$VENV_FROM/bin/edge-agent" --version >/dev/null 2>&1 \
        || die "--venv-from $VENV_FROM: no working bin/edge-agent there"
    VENV_FROM="$(cd "$VENV_FROM" && pwd)"
    dir "$ROOT$PREFIX" 0755
    if [ "$(readlink "$VENV_DIR" 2>/dev/null)" != "$VENV_FROM" ]; then
        [ ! -e "$VENV_DIR" ] || [ -L "$VENV_DIR" ] || die "$VENV_DIR exists and is not a link"
        ln -sfn "$VENV_FROM" "$VENV_DIR"
        say "linked $VENV_DIR -> $VENV_FROM"
    fi
}

# --- user and groups --------------------------------------------------------------------------
install_user() {
    local group
    if [ -n "$DESTDIR" ]; then
        say "DESTDIR set, not creating: groups video, render, $SERVICE_USER; system user $SERVICE_USER (home /var/lib/edge-agent, groups video,render)"
        return 0
    fi
    for group in video render "$SERVICE_USER"; do
        getent group "$group" >/dev/null || { groupadd --system "$group"; say "created group $group"; }
    done
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_USER" --groups video,render --home-dir /var/lib/edge-agent \
            --no-create-home --shell /usr/sbin/nologin --comment "edge-agent daemon" "$SERVICE_USER"
        say "created user $SERVICE_USER"
    elif ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx render \
         || ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx video; then
        usermod --append --groups video,render "$SERVICE_USER"
        say "added $SERVICE_USER to video and render"
    fi
}

# --- configuration skeleton -------------------------------------------------------------------
install_config() {
    dir "$ETC" 0755
    dir "$ETC/conf.d" 0755
    dir "$ETC/credentials" 0700  # root only: systemd copies them for the service
    if [ ! -e "$ETC/agent.toml" ]; then
        install -m 0644 "$REPO/config/agent.example.toml" "$ETC/agent.toml"
        say "wrote $ETC/agent.toml (edit mqtt.host and model.path)"
    fi
    dir "$ROOT/var/lib" 0755
    if [ ! -d "$STATE/models" ]; then
        install -d -m 0755 "$STATE" "$STATE/models"
        [ -n "$DESTDIR" ] || chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"
        say "created $STATE/models"
    fi
}

# --- systemd unit -----------------------------------------------------------------------------
install_unit() {
    sed "s|^ExecStart=/opt/edge-agent/venv/bin/edge-agent |ExecStart=$PREFIX/venv/bin/edge-agent |" \
        "$REPO/systemd/$UNIT_NAME" | put "$UNIT_DIR/$UNIT_NAME" 0644
    local nodes
    nodes="$(jetson_nodes)"
    if [ -n "$nodes" ]; then
        { echo "# Written by scripts/install.sh: this Jetson's GPU device nodes."
          echo "[Service]"
          echo "$nodes" | sed 's/^/DeviceAllow=/; s/$/ rw/'
          echo "# CSI cameras (nvarguscamerasrc) talk to nvargus-daemon through this socket,"
          echo "# which PrivateTmp= would hide."
          echo "BindPaths=-/tmp/argus_socket"
        } | put "$UNIT_DIR/$UNIT_NAME.d/jetson.conf" 0644
    fi
    systemctl_do daemon-reload
    systemctl_do enable "$UNIT_NAME"
}

# Device nodes of a Jetson's iGPU (names vary by JetPack), one a line; nothing elsewhere.
jetson_nodes() {
    local node
    [ -e "$HOST_ROOT/etc/nv_tegra_release" ] \
        || grep -qs "nvidia,tegra" "$HOST_ROOT/proc/device-tree/compatible" || return 0
    for node in "$HOST_ROOT"/dev/nvmap "$HOST_ROOT"/dev/nvhost-* "$HOST_ROOT"/dev/nvgpu/*/* \
                "$HOST_ROOT"/dev/host1x-fence; do
        [ -e "$node" ] && echo "${node#"$HOST_ROOT"}"
    done
    return 0
}

do_install() {
    if [ "$VENV" -eq 1 ]; then
        if [ -n "$VENV_FROM" ]; then link_venv; else install_venv; fi
        [ -e "$ROOT$PREFIX/$MARKER" ] || echo "edge-agent venv and files; removed by install.sh --uninstall" \
            >"$ROOT$PREFIX/$MARKER"
    else
        say "--no-venv: expecting $PREFIX/venv/bin/edge-agent to be installed some other way"
    fi
    install_user
    install_config
    install_unit
    say "done. Next: edit $ETC/agent.toml (mqtt.host, model.path), put broker secrets in"
    say "$ETC/credentials/, then: systemctl start edge-agent; journalctl -fu edge-agent"
}

do_uninstall() {
    systemctl_do disable --now "$UNIT_NAME" || true  # not installed, or already gone
    if [ -e "$UNIT_DIR/$UNIT_NAME" ]; then
        rm -f "$UNIT_DIR/$UNIT_NAME"
        say "removed $UNIT_DIR/$UNIT_NAME"
    fi
    rm -f "$UNIT_DIR/$UNIT_NAME.d/jetson.conf"
    rmdir "$UNIT_DIR/$UNIT_NAME.d" 2>/dev/null || true  # an operator's override stays
    systemctl_do daemon-reload
    if [ -e "$ROOT$PREFIX/$MARKER" ]; then
        rm -rf "$ROOT$PREFIX"
        say "removed $ROOT$PREFIX"
    elif [ -e "$VENV_DIR/.edge-agent-source" ]; then
        rm -rf "$VENV_DIR"
        say "removed $VENV_DIR ($ROOT$PREFIX was not made by install.sh: left alone)"
    fi
    say "kept: $ETC (settings, credentials), $STATE (models) and the user $SERVICE_USER;"
    say "remove them by hand if they are no longer wanted"
}

if [ "$UNINSTALL" -eq 1 ]; then
    do_uninstall
else
    do_install
fi
