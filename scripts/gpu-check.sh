#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, install the CUDA build of ONNX Runtime GenAI into a
# venv, take a small model, let the agent's own provider logic (provider = "auto") load it, check
# that CUDA was chosen, and print tokens/s on CUDA and on the CPU.
#
#   scripts/gpu-check.sh [--model DIR] [--tokens N] [--venv DIR]
#
# Exit codes: 0 CUDA chosen and measured; 2 no NVIDIA GPU; 3 the CUDA packages could not be
# installed or loaded (the message says which library is missing); 4 auto did not choose CUDA;
# 1 anything else.
#
# Packages, online: `pip install onnxruntime-genai-cuda` (pulls onnxruntime-gpu). Offline: put
# wheels in ./.whl and they are installed with --no-index. An onnxruntime-gpu already installed
# (in the system Python or the venv) is used as is. A wheel too big to carry in one piece may be
# split: ./.whl/NAME.whl.part-aa, -ab, ... are joined back into ./.whl/NAME.whl before installing.
#
# How the lead carries the wheels to the lent machine (offline, x86_64, Python 3.12; the run tool
# carries at most 64 MiB per call, and ignored files already on a warm machine stay between calls):
#   W="--python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps -d"
#   pip download $W .whl onnxruntime-genai-cuda==0.18.0       # 16.7 MB
#   pip download $W .whl pydantic pydantic-core pydantic-settings typing-extensions \
#       annotated-types typing-inspection python-dotenv structlog   # only if the machine lacks them
#   pip download $W /tmp/big onnxruntime-gpu==1.31.1          # 255 MB: too big for one call
#   split -b 60M /tmp/big/onnxruntime_gpu-1.31.1-*.whl .whl/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl.part-
#   then one call per part: carry [".whl/<that part>"] with a command like `ls .whl`, and a last
#   call carrying the small wheels and the model that runs this script. The tiny model (~1 MB) can
#   be built here and carried too, if the machine lacks onnx/tokenizers:
#   python scripts/build_test_models.py tiny  ->  cp -r <printed folder> .gpu-check/model
# CUDA versions: onnxruntime-gpu 1.31 and onnxruntime-genai-cuda 0.18 link against CUDA 13
# (libcublas.so.13, libcudart.so.13, cuDNN 9 for CUDA 13). A machine whose CUDA libraries are 12.x
# (e.g. torch built for cu12, with its nvidia-*-cu12 wheels) needs the CUDA 12 pair instead:
# onnxruntime-gpu==1.24.4 (its extras ask for *-cu12) with onnxruntime-genai-cuda==0.13.0 (requires
# onnxruntime-gpu>=1.24.4). The script prints the libraries it cannot find (ldd) so this is plain.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$REPO/.gpu-check"
VENV="${GPU_CHECK_VENV:-$WORK/venv}"
MODEL="${GPU_CHECK_MODEL:-}"
TOKENS="${GPU_CHECK_TOKENS:-128}"
PYTHON="${PYTHON:-python3}"
WHEELS="$REPO/.whl"

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --tokens) TOKENS="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 1 ;;
    esac
done

say() { echo "gpu-check: $*" >&2; }
die() { local code="$1"; shift; echo "gpu-check: FAIL: $*" >&2; exit "$code"; }

# 1. Is there an NVIDIA GPU at all?
gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null || true)"
fi
if [ -z "$gpus" ] && ls /proc/driver/nvidia/gpus/*/information >/dev/null 2>&1; then
    gpus="$(grep -h '^Model:' /proc/driver/nvidia/gpus/*/information || true)"
fi
[ -n "$gpus" ] || [ -f /etc/nv_tegra_release ] || die 2 "no NVIDIA GPU here (nvidia-smi -L lists none and /proc/driver/nvidia/gpus is empty); run this on a machine with an NVIDIA GPU or a Jetson"
say "GPU: ${gpus:-Jetson ($(head -1 /etc/nv_tegra_release))}"
mkdir -p "$WORK"

# 2. A venv that also sees the system's packages (torch's nvidia-* CUDA libraries, numpy, ...).
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null || {
        rm -rf "$VENV"  # no ensurepip (Debian without python3-venv): a venv without its own pip
        "$PYTHON" -m venv --without-pip --system-site-packages "$VENV" || die 1 "cannot create a venv with $PYTHON"
    }
fi
PY="$VENV/bin/python"
if "$PY" -m pip --version >/dev/null 2>&1; then PIP=("$PY" -m pip); else PIP=("$PYTHON" -m pip --python "$PY"); fi
has() { "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" >/dev/null 2>&1; }
"$PY" -c 'import sys; print("gpu-check: python", sys.version.split()[0])' >&2

pip_args=(-q --disable-pip-version-check)
if [ -d "$WHEELS" ]; then
    for first in "$WHEELS"/*.whl.part-aa; do
        [ -e "$first" ] || continue
        whole="${first%.part-aa}"
        [ -f "$whole" ] || { say "joining $(basename "$whole") from its parts"; cat "${whole}".part-* > "$whole.tmp"; mv "$whole.tmp" "$whole"; }
    done
    pip_args+=(--no-index --find-links "$WHEELS")
    say "offline: installing from $WHEELS"
fi

# 3. The CUDA build of ORT GenAI (replaces the CPU one: both are the onnxruntime_genai module).
if ! has onnxruntime-genai-cuda; then
    if has onnxruntime-gpu; then
        say "onnxruntime-gpu $("$PY" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))') already present: installing onnxruntime-genai-cuda without dependencies"
        "${PIP[@]}" install "${pip_args[@]}" --no-deps onnxruntime-genai-cuda || die 3 "pip install onnxruntime-genai-cuda failed"
    else
        "${PIP[@]}" install "${pip_args[@]}" onnxruntime-genai-cuda || die 3 "pip install onnxruntime-genai-cuda (with onnxruntime-gpu) failed; offline, put both wheels in .whl (see the comment at the top)"
    fi
fi
# The agent's own needs for `edge-agent models verify` (no MQTT or camera code is imported).
"$PY" -c 'import pydantic, pydantic_settings, structlog' 2>/dev/null \
    || "${PIP[@]}" install "${pip_args[@]}" pydantic pydantic-settings structlog \
    || die 3 "cannot install pydantic, pydantic-settings, structlog (offline: add their wheels to .whl)"

# CUDA libraries that came as pip wheels (torch's nvidia-*, or onnxruntime-gpu's extras).
nvidia_libs="$("$PY" - <<'EOF'
import glob, os, site, sys
dirs = []
for base in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
    dirs += glob.glob(os.path.join(base, "nvidia", "*", "lib"))
print(":".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))
EOF
)"
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import torch; print("gpu-check: torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null >&2 || true

og_dir="$("$PY" -c 'import os, onnxruntime_genai as og; print(os.path.dirname(og.__file__))' 2>/dev/null)" \
    || die 3 "onnxruntime_genai does not import in $VENV"
ort_dir="$("$PY" -c 'import os, onnxruntime as o; print(os.path.dirname(o.__file__))' 2>/dev/null)" \
    || die 3 "onnxruntime does not import in $VENV"
say "onnxruntime_genai from $og_dir; onnxruntime from $ort_dir"
missing=""
for lib in "$og_dir/libonnxruntime-genai-cuda.so" "$ort_dir/capi/libonnxruntime_providers_cuda.so"; do
    [ -f "$lib" ] || { missing+=" $(basename "$lib") (absent: not a CUDA build)"; continue; }
    gone="$(ldd "$lib" 2>/dev/null | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')"
    [ -z "$gone" ] || missing+=" $(basename "$lib") needs: $gone;"
done
[ -z "$missing" ] || die 3 "CUDA libraries missing:$missing (CUDA 13 libraries for onnxruntime-gpu 1.31 / genai-cuda 0.18; on a CUDA 12 machine use onnxruntime-gpu==1.24.4 with onnxruntime-genai-cuda==0.13.0, see the top of this script)"

# 4. A small model: given, carried in .gpu-check/model, or built (needs onnx, tokenizers, numpy).
if [ -z "$MODEL" ]; then
    if [ -f "$WORK/model/genai_config.json" ]; then
        MODEL="$WORK/model"
    else
        say "building the tiny test model"
        MODEL="$(EDGE_AGENT_MODEL_CACHE="$WORK/cache" "$PY" "$REPO/scripts/build_test_models.py" tiny | tail -1)" \
            || die 1 "cannot build the tiny model (needs onnx, tokenizers, numpy); build it elsewhere and carry it as .gpu-check/model"
    fi
fi
[ -f "$MODEL/genai_config.json" ] || die 1 "$MODEL is not a model folder"
MODEL="$(cd "$MODEL" && pwd)"  # the config written below is elsewhere: relative paths would move
say "model: $MODEL"

# 5. The agent's provider logic decides: provider = "auto", fallback to the CPU allowed.
config="$WORK/agent.toml"
printf 'state_dir = "%s"\nlog_format = "json"\n[model]\npath = "%s"\nprovider = "auto"\n' "$WORK/state" "$MODEL" > "$config"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m edge_agent providers --config "$config" >&2 || true
auto_json="$("$PY" -m edge_agent models verify --config "$config" --tokens "$TOKENS" --json)" \
    || die 1 "edge-agent models verify (auto) failed"
cpu_json="$("$PY" -m edge_agent models verify --config "$config" --tokens "$TOKENS" --provider cpu --strict --json)" \
    || die 1 "edge-agent models verify (cpu) failed"
field() { "$PY" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
provider="$(field "$auto_json" provider)"
echo "auto chose: $provider ($(field "$auto_json" reason))"
echo "$provider (auto): $(field "$auto_json" tokens_per_s) tokens/s ($(field "$auto_json" tokens) tokens, load $(field "$auto_json" load_ms) ms)"
echo "cpu (forced): $(field "$cpu_json" tokens_per_s) tokens/s ($(field "$cpu_json" tokens) tokens, load $(field "$cpu_json" load_ms) ms)"
[ "$provider" = "cuda" ] || die 4 "provider = \"auto\" chose $provider, not cuda"
echo "gpu-check: OK: auto chose CUDA"
