"""A Phi-3.5-mini-shaped model with 2 layers instead of 32, random weights, int4 for CPU, built
by the ONNX Runtime GenAI builder: for the memory benchmark (bench/fit.py) only, built on
demand, never by the test suite.

Phi-3.5-mini's shape: hidden 3072, 32 heads, 32 KV heads of 96, intermediate 8192, vocab
32064; context 4096 here (the real one is 128k with LongRoPE, which only changes the rotary
tables). The cache per token grows linearly with the layers (2 here: 48 KB a token in float32,
against 786 KB for the real 32), so its figures scale to the real model; the weights do not
(embeddings and lm_head are most of these 2 layers' weights).

The steps: the tiny recipes' byte-level tokenizer, padded with plain added tokens up to the
vocabulary (random logits pick any id: each must decode); a random `Phi3ForCausalLM` saved by
transformers in the build venv (the one smollm2.py makes: torch CPU, transformers); then the
builder: `-p int4 -e cpu`. Measured here (build venv cached): 36 s; the result 605 MB (the
embeddings stay float32: 394 MB).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from testmodels.phi3 import EOS_TOKENS, train_tokenizer, write_tokenizer_files
from testmodels.smollm2 import _build_python, _run

RECIPE_VERSION = 1
_started = time.monotonic()

SHAPE = {"hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 32,
         "intermediate_size": 8192, "vocab_size": 32064, "num_hidden_layers": 2,
         "max_position_embeddings": 4096, "original_max_position_embeddings": 4096}

# Runs in the build venv: the random model, saved as a Hugging Face folder.
SAVE_RANDOM = r'''
import json, sys, torch
from transformers import Phi3Config, Phi3ForCausalLM
shape, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = Phi3Config(**shape, rope_scaling=None, tie_word_embeddings=False, **ids)
model = Phi3ForCausalLM(config).to(torch.float16)
model.save_pretrained(out)
'''


def _log(msg: str) -> None:
    print(f"[phi35-2l {time.monotonic() - _started:6.1f}s] {msg}", file=sys.stderr, flush=True)


def build(out_dir: Path) -> None:
    import json

    out_dir = out_dir.resolve()
    python = _build_python()
    tok = train_tokenizer()
    # Plain (not special) added tokens decode to their own text: random output stays printable.
    tok.add_tokens([f"<x{n}>" for n in range(tok.get_vocab_size(), SHAPE["vocab_size"])])
    eos = [tok.token_to_id(t) for t in EOS_TOKENS]
    ids = {"bos_token_id": eos[0], "eos_token_id": eos, "pad_token_id": eos[0]}
    with tempfile.TemporaryDirectory(prefix="phi35-build-") as tmp_name:
        hf = Path(tmp_name) / "hf"
        hf.mkdir()
        _log("random Phi-3.5-mini-shaped weights (2 layers)")
        _run([python, "-c", SAVE_RANDOM, json.dumps(SHAPE), json.dumps(ids), hf])
        write_tokenizer_files(tok, hf, context=SHAPE["max_position_embeddings"])
        _log("ORT GenAI builder: int4, cpu")
        _run([python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out_dir,
              "-c", Path(tmp_name) / "cache", "-p", "int4", "-e", "cpu", "--extra_options", "hf_token=false"],
             cwd=Path(tmp_name))
    size = sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6
    _log(f"done: {size:.0f} MB in {out_dir}")
