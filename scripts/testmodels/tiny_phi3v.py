r"""Tiny random-weight Phi-3.5-vision-style (`type: phi3v`) model that real onnxruntime-genai loads.

No torch: three small graphs written with `onnx.helper`, with the genai_config.json /
processor_config.json layout of onnxruntime-genai's test/test_models/vision-preprocessing fixture
(a Phi-3-vision export; the official Phi-3.5-vision ONNX folder has the same three sessions):
- vision:    pixel_values [N,17,3,336,336] + image_sizes [N,2] -> image_features [T,64]
             (per-crop mean colours projected, plus a learned per-row term; T is computed from
             image_sizes exactly as the processor counts image tokens);
- embedding: input_ids (negative ids = image slots) + image_features -> inputs_embeds;
- text:      the shared decoder (phi3.py) with `inputs_embeds` in place of `input_ids` (context 4096),
plus processor_config.json (DecodeImage, ConvertRGB, Phi3ImageTransform num_crops 16 /
num_img_tokens 144). Tokenizer, Phi-3 chat template and the never-EOS logit bias are phi3.py's
(vocab 645, EOS ids [640, 643]). The tokenizer needs no `<|image_N|>` tokens: ORT GenAI's phi3v
processor splits the prompt on the regex `<\|image_\d+\|>`, encodes the text pieces and inserts
num_image_tokens copies of -N for each tag itself.

Measured with onnxruntime-genai 0.18.0 (CPU, 2 cores): build ~0.2 s, 1.7 MB, load ~25 ms.
- Images: `inputs = processor(prompt, images=og.Images.open_bytes(jpeg, ...))`, then
  `generator.set_inputs(inputs)`. Every image is 17 crops; a 200x300 JPEG -> image_sizes
  [1008,1344], 1,921 image tokens; 64x64 or 1000x1000 -> [1344,1344], 2,509; 100x4000 -> 2,473.
  Chat prompt "<|image_1|>\nWhat is in this image?" -> 1,937 tokens, processor 30-70 ms,
  set_inputs + 16 greedy tokens 25-45 ms; two 200x300 images -> 3,862 tokens, processor
  110-270 ms, 16 tokens 80-120 ms, peak RSS ~470 MB (`search.chunk_size` 512; without it the
  full-prompt attention takes 1.6 GB and ~1.4 s). Different images give different tokens.
  Two 64x64 images (5,028 tokens) do not fit: set_inputs raises "input_ids size (5028) + current
  sequence length (0) exceeds max length (4096)".
- Text only: `processor(prompt, images=None)` (or `processor(prompt)`) + set_inputs works and
  gives the same ids as `tokenizer.encode(prompt)` + `generator.append_tokens(ids)`, which also
  works (same tokens); 13-token prompt, 16 tokens in ~1 ms.
- Errors (RuntimeError, the process lives on): tags vs images mismatch (1 tag + 2 images,
  2 tags + 1 image, no tag + 1 image, a tag with images=None): "Number of unique image tags does
  not match the number of images."; tags 1 and 3 with 2 images: "Encountered unexpected value of
  image_id in the prompt. Expected a value <= 2. Actual value: 3". `<|image_1|>` twice with one
  image passes the processor (3,842 image slots) but set_inputs fails in this embedding graph
  (Gather 'img_emb' index out of bounds).
- PNG works like JPEG. BMP, WebP, TIFF or garbage bytes: `og.Images.open_bytes` accepts them, then
  the processor call prints "Not a JPEG file: starts with 0x42 0x4d" (BMP) to stderr and the
  whole process exits with code 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from testmodels.phi3 import (EOS_TOKENS, HIDDEN, Graph, decoder_graph, genai_config, logit_bias,
                             train_tokenizer, write_tokenizer_files)

RECIPE_VERSION = 1

CONTEXT = 4096  # one 200x300 image alone is 1,921 prompt tokens
SEED = 11
CROPS = 17  # Phi3ImageTransform with num_crops 16: the global view + 16 HD crops, always
CROP_SIZE = 336
IMG_TOKENS = 144  # tokens per 336x336 crop (num_img_tokens)
TEXT_FILE, EMBED_FILE, VISION_FILE = "tiny-phi3v-text.onnx", "tiny-phi3v-embedding.onnx", "tiny-phi3v-vision.onnx"

# As in onnxruntime-genai's test/test_models/vision-preprocessing/processor_config.json.
PROCESSOR_CONFIG = {
    "processor": {
        "name": "image_processing",
        "transforms": [
            {"operation": {"name": "decode_image", "domain": "com.microsoft.extensions",
                           "type": "DecodeImage", "attrs": {"color_space": "BGR"}}},
            {"operation": {"name": "convert_to_rgb", "domain": "com.microsoft.extensions",
                           "type": "ConvertRGB"}},
            {"operation": {"name": "phi3_image_transform", "domain": "com.microsoft.extensions",
                           "type": "Phi3ImageTransform",
                           "attrs": {"num_crops": CROPS - 1, "num_img_tokens": IMG_TOKENS}}},
        ],
    }
}

_F32, _I64 = TensorProto.FLOAT, TensorProto.INT64


def _vision_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """pixel_values [N,17,3,336,336], image_sizes [N,2] -> image_features [T,HIDDEN].

    T must be exactly the number of image tokens the processor put in the prompt:
    per image, with h, w = image_sizes / 336, (h*w + 1)*144 + 1 + (h + 1)*12. Each feature
    row is a projection of that image's per-crop mean colours plus a learned per-row term,
    so different images give different features.
    """
    g = Graph(rng)
    # [N,17,3] per-crop channel means -> [N,51] -> [N,HIDDEN]
    means = g.node("ReduceMean", ["pixel_values"], "crop_means", axes=[3, 4], keepdims=0)
    g.const("flat_shape", np.array([0, CROPS * 3], np.int64))
    flat = g.node("Reshape", [means, "flat_shape"], "crop_means_flat")
    per_image = g.node("MatMul", [flat, g.weight("w_img", [CROPS * 3, HIDDEN], 1.0 / np.sqrt(CROPS * 3))], "per_image")

    # Token count per image from image_sizes (the HD-transformed height and width).
    g.const("crop", np.int64(CROP_SIZE))
    g.const("c1", np.int64(1))
    g.const("c0", np.int64(0))
    g.const("c12", np.int64(12))
    g.const("c_img", np.int64(IMG_TOKENS))
    g.const("ax0", np.array([0], np.int64))
    g.const("ax1", np.array([1], np.int64))
    tiles = g.node("Div", ["image_sizes", "crop"], "tiles")  # [N,2]: h/336, w/336
    g.const("i0", np.array([0], np.int64))
    g.const("i1", np.array([1], np.int64))
    h = g.node("Squeeze", [g.node("Gather", [tiles, "i0"], "h_col", axis=1), "ax1"], "h")
    w = g.node("Squeeze", [g.node("Gather", [tiles, "i1"], "w_col", axis=1), "ax1"], "w")
    grid = g.node("Mul", [g.node("Add", [g.node("Mul", [h, w], "hw"), "c1"], "hw1"), "c_img"], "grid_tokens")
    newlines = g.node("Mul", [g.node("Add", [h, "c1"], "h1"), "c12"], "newline_tokens")
    counts = g.node("Add", [g.node("Add", [grid, "c1"], "grid_sep"), newlines], "counts")  # [N]
    ends = g.node("CumSum", [counts, "c0"], "ends")  # [N]
    total = g.node("ReduceSum", [counts], "total", keepdims=0)
    rows = g.node("Range", ["c0", total, "c1"], "rows")  # [T]
    # image index of each row: how many images end at or before it
    after = g.node("GreaterOrEqual", [g.node("Unsqueeze", [rows, "ax1"], "rows_col"),
                                      g.node("Unsqueeze", [ends, "ax0"], "ends_row")], "after")
    after = g.node("Cast", [after], "after_i", to=TensorProto.INT64)
    img_idx = g.node("ReduceSum", [after, "ax1"], "img_idx", keepdims=0)
    starts = g.node("Sub", [ends, counts], "starts")
    local = g.node("Sub", [rows, g.node("Gather", [starts, img_idx], "row_start")], "local")
    local = g.node("Mod", [local, "c_img"], "local_mod")
    row_term = g.node("Gather", [g.weight("w_row", [IMG_TOKENS, HIDDEN], 0.5), local], "row_term")
    feats = g.node("Add", [g.node("Gather", [per_image, img_idx], "row_image"), row_term], "image_features")
    return g.model(
        "tiny_phi3v_vision",
        [helper.make_tensor_value_info("pixel_values", _F32, ["num_images", CROPS, 3, CROP_SIZE, CROP_SIZE]),
         helper.make_tensor_value_info("image_sizes", _I64, ["num_images", 2])],
        [helper.make_tensor_value_info(feats, _F32, ["num_image_tokens", HIDDEN])],
    )


def _embedding_graph(rng: np.random.Generator, vocab: int) -> onnx.ModelProto:
    """input_ids [B,S] (negative = image slot), image_features [T,HIDDEN] -> inputs_embeds [B,S,HIDDEN].

    Token ids look up a table; the k-th negative id (in reading order) takes row k of
    image_features, like the real model's scatter. image_features is [0,HIDDEN] for
    text-only prompts and for every step after the prompt.
    """
    g = Graph(rng)
    g.const("minus1", np.array([-1], np.int64))
    g.const("c0", np.int64(0))
    g.const("c1", np.int64(1))
    g.const("ax1", np.array([1], np.int64))
    g.const("pad_row", np.zeros((1, HIDDEN), np.float32))
    g.const("hidden", np.array([HIDDEN], np.int64))
    ids = g.node("Reshape", ["input_ids", "minus1"], "ids_flat")
    is_image = g.node("Less", [ids, "c0"], "is_image")
    tok = g.node("Gather", [g.weight("embed", [vocab, HIDDEN], 1.0), g.node("Max", [ids, "c0"], "ids_safe")], "tok_emb")
    slot = g.node("Sub", [g.node("CumSum", [g.node("Cast", [is_image], "is_image_i", to=TensorProto.INT64), "c0"],
                                 "image_rank"), "c1"], "slot_raw")
    slot = g.node("Max", [slot, "c0"], "slot")
    # One zero row appended so the Gather is valid when there are no image features.
    feats = g.node("Concat", ["image_features", "pad_row"], "features_padded", axis=0)
    img = g.node("Gather", [feats, slot], "img_emb")
    mixed = g.node("Where", [g.node("Unsqueeze", [is_image, "ax1"], "is_image_col"), img, tok], "embeds_flat")
    shape = g.node("Concat", [g.node("Shape", ["input_ids"], "ids_shape"), "hidden"], "embeds_shape", axis=0)
    out = g.node("Reshape", [mixed, shape], "inputs_embeds")
    return g.model(
        "tiny_phi3v_embedding",
        [helper.make_tensor_value_info("input_ids", _I64, ["batch", "seq"]),
         helper.make_tensor_value_info("image_features", _F32, ["num_image_tokens", HIDDEN])],
        [helper.make_tensor_value_info(out, _F32, ["batch", "seq", HIDDEN])],
    )


def _genai_config(vocab: int, eos_ids: list[int]) -> dict:
    sessions = {
        "embedding": {
            "filename": EMBED_FILE,
            "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
            "outputs": {"inputs_embeds": "inputs_embeds"},
        },
        "vision": {
            "filename": VISION_FILE,
            "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
            "outputs": {"image_features": "image_features"},
        },
    }
    # Prefill in 512-token chunks: a 2-image prompt (3,862 tokens) otherwise builds
    # full [4,S,S] attention matrices (1.6 GB RSS, 1.4 s instead of 0.47 GB, 0.1 s).
    return genai_config(vocab, eos_ids, model_type="phi3v", context=CONTEXT, decoder_file=TEXT_FILE,
                        token_input="inputs_embeds", sessions=sessions, search={"chunk_size": 512})


def build(out_dir: Path) -> None:
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    eos_ids = [tok.token_to_id(t) for t in EOS_TOKENS]
    write_tokenizer_files(tok, out_dir, context=CONTEXT)
    rng = np.random.default_rng(SEED)
    onnx.save(_vision_graph(rng), str(out_dir / VISION_FILE))
    onnx.save(_embedding_graph(rng, vocab), str(out_dir / EMBED_FILE))
    onnx.save(decoder_graph(vocab, logit_bias(tok), context=CONTEXT, inputs_embeds=True), str(out_dir / TEXT_FILE))
    (out_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    (out_dir / "genai_config.json").write_text(json.dumps(_genai_config(vocab, eos_ids), indent=2))
