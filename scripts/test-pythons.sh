#!/usr/bin/env bash
# Runs the whole suite on the other supported Pythons, 3.10 (JetPack 6) and 3.12 (JetPack 7), each
# in its own venv with the newest ONNX Runtime GenAI that has a wheel for it (3.10: 0.11.x, since
# 0.12 and later have no cp310 wheels; 3.12: the newest). Extra arguments go to pytest, e.g.
# `scripts/test-pythons.sh -m "not slow"`.
#
# Interpreters: pyenv's newest 3.10.x / 3.12.x when pyenv has them, else python3.10 / python3.12
# on PATH; a Python found nowhere is skipped with a message. PYTHONS="3.12" picks a subset.
# Venvs: $EDGE_AGENT_PY_VENVS/venv310 and venv312 (default /tmp), made once and reinstalled when
# pyproject.toml changes. System packages (mosquitto, ffmpeg) as for scripts/test.sh: setup.sh.
# Exit status: 0 only when every Python that was found passed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_ROOT="${EDGE_AGENT_PY_VENVS:-/tmp}"
PYTHONS="${PYTHONS:-3.10 3.12}"
PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"

find_python() {  # $1 = 3.10 -> the path of an interpreter, or nothing
    local found
    found="$(ls -d "$PYENV_ROOT/versions/$1".[0-9]* 2>/dev/null | grep -E "/$1\.[0-9]+$" | sort -V | tail -n 1 || true)"
    if [ -n "$found" ] && [ -x "$found/bin/python" ]; then
        echo "$found/bin/python"
    elif command -v "python$1" >/dev/null 2>&1; then
        command -v "python$1"
    fi
}

make_venv() {  # $1 = interpreter, $2 = venv folder
    local stamp="$2/.edge-agent-installed"
    if [ ! -x "$2/bin/python" ]; then
        echo "test-pythons: creating $2 with $1" >&2
        "$1" -m venv "$2"
    fi
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
        echo "test-pythons: installing edge-agent[test,models] into $2" >&2
        "$2/bin/python" -m pip install -q -e "$REPO[test,models]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
        "$2/bin/python" -c "import edge_agent, onnxruntime_genai, paho.mqtt, pytest"
        touch "$stamp"
    fi
}

# The SmolLM2 build tools need Python >= 3.11; a 3.10 run that has to build it uses this one.
if [ -z "${EDGE_AGENT_BUILD_PYTHON:-}" ]; then
    for v in 3.12 3.11; do
        candidate="$(find_python "$v")"
        if [ -n "$candidate" ]; then export EDGE_AGENT_BUILD_PYTHON="$candidate"; break; fi
    done
fi

declare -a summary=()
status=0
for version in $PYTHONS; do
    python="$(find_python "$version")"
    if [ -z "$python" ]; then
        echo "test-pythons: no Python $version (neither pyenv's $PYENV_ROOT/versions/$version.* nor python$version on PATH): skipped" >&2
        summary+=("Python $version: skipped (not found)")
        continue
    fi
    venv="$VENV_ROOT/venv${version//./}"
    make_venv "$python" "$venv"
    genai="$("$venv/bin/python" -c "import onnxruntime_genai as og; print(og.__version__)")"
    echo "test-pythons: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), onnxruntime-genai $genai" >&2
    # Build (or find cached) test models first: a build failure is clearer here than inside pytest.
    for model in tiny tiny-vision smollm2; do
        "$venv/bin/python" "$REPO/scripts/build_test_models.py" "$model" >/dev/null
    done
    if (cd "$REPO" && "$venv/bin/python" -m pytest -q "$@"); then
        summary+=("Python $version (onnxruntime-genai $genai): passed")
    else
        summary+=("Python $version (onnxruntime-genai $genai): FAILED")
        status=1
    fi
done
printf 'test-pythons: %s\n' "${summary[@]}" >&2
exit "$status"
