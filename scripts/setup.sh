#!/usr/bin/env bash
# Installs what edge-agent's demo and tests need on a fresh Debian/Ubuntu machine:
# system packages (mosquitto, ffmpeg, systemd-analyze, strace, prometheus, python venv), a venv in .venv, the package and its extras.
# Idempotent: each step is skipped when already done. Sourced by demo.sh and test.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGE_AGENT_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
# strace shows that no request field reaches the file system (tests/test_hostile.py).
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
# systemd-analyze checks the unit (verify, security score); the package does not boot anything.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
"$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
# prometheus + promtool: tests scrape the agent's /metrics with a real Prometheus and lint it
# (tests/prometheus.py). Installed without recommends: those add node-exporter, another service.
need_prometheus=0
{ command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ]; } || need_prometheus=1
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ${#need_apt[@]} -gt 0 ] || [ $need_prometheus -eq 1 ]; then
    $SUDO apt-get update -qq
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a system broker on 1883; the demo and tests run private ones.
if [ $need_prometheus -eq 1 ]; then
    echo "setup: installing prometheus" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package enables and starts a system Prometheus on :9090; the tests run private ones
    # on free ports, so the one we just installed is stopped and left disabled.
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.edge-agent-installed"
if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
    echo "setup: installing edge-agent into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -m pip install -q -e "$REPO[test,models,hub]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import edge_agent, onnxruntime_genai, paho.mqtt, pytest" 
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
