"""Tiny random-weight Phi-3-style model that real onnxruntime-genai loads (no torch needed).

The decoder is written directly with `onnx.helper` (standard opset-17 ops) and the
tokenizer is trained with `tokenizers` on a small built-in corpus, so the build is
deterministic, offline and takes well under a second. The answers are gibberish; the
model exists to exercise the loading, chat-template, streaming and sampling paths.

Behaviour measured with onnxruntime-genai 0.18.0 (CPU, 2 cores):
- build ~0.3 s, model.onnx ~0.7 MB, load <0.03 s (0.06 s with the import),
  ~25-30k tokens/s greedy decode.
- vocab 645: 640 byte-level BPE tokens, then the Phi-3 specials; EOS ids [640, 643]
  (<|endoftext|>, <|end|>). Special tokens and lone UTF-8 bytes get a -1e4 logit bias,
  so decoding (greedy or sampled) never emits EOS and ends on max_length, and the
  gibberish is printable ASCII.
- og.Tokenizer.decode drops special tokens: "<|user|>\nhi<|end|>\n" decodes to "\nhi\n".
- over the context, ORT GenAI raises RuntimeError and stays usable (no crash):
  `og.Generator(model, params)` after `set_search_options(max_length=664)`:
  "max_length (664) cannot be greater than model context_length (512)";
  `append_tokens` of a 600-token prompt with max_length 512:
  "input_ids size (600) + current sequence length (0) exceeds max length (512)".
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from testmodels.phi3 import (EOS_TOKENS, decoder_graph, genai_config, logit_bias, train_tokenizer,
                             write_tokenizer_files)

RECIPE_VERSION = 1

CONTEXT = 512


def build(out_dir: Path) -> None:
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    eos_ids = [tok.token_to_id(t) for t in EOS_TOKENS]
    write_tokenizer_files(tok, out_dir, context=CONTEXT)
    onnx.save(decoder_graph(vocab, logit_bias(tok), context=CONTEXT), str(out_dir / "model.onnx"))
    config = genai_config(vocab, eos_ids, model_type="phi3", context=CONTEXT, decoder_file="model.onnx",
                          token_input="input_ids")
    (out_dir / "genai_config.json").write_text(json.dumps(config, indent=2))
