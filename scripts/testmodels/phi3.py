"""What both tiny Phi-3 recipes are made of (tiny_phi3.py, tiny_phi3v.py): the byte-level BPE
tokenizer trained on a built-in corpus, the never-EOS logit bias, the decoder graph written with
`onnx.helper` (standard opset-17 ops), genai_config.json and the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HIDDEN, LAYERS, HEADS, FFN = 64, 2, 4, 128
HEAD_SIZE = HIDDEN // HEADS
VOCAB_TARGET = 640  # byte alphabet (256) + merges, before the special tokens
DECODER_SEED = 7  # any seed works; this one happens to give inoffensive gibberish
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
EOS_TOKENS = ["<|endoftext|>", "<|end|>"]  # Phi-3 stops on either

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the BPE merges: plain English, enough for a few hundred merges.
CORPUS = """\
The edge agent listens for prompts on a message broker and answers them with a small
language model that runs on the device itself. Every request carries an identifier, a
prompt and a few options such as the maximum number of tokens, the temperature and the
sampling method. The answer is streamed back in small pieces, so that the caller can
show the text while the model is still thinking about the rest of it.
What is two plus two? Two plus two is four. What is the capital of France? The capital
of France is Paris. Hello world, how are you today? I am fine, thank you for asking.
Please describe the weather in one short sentence. It is sunny and warm, with a light
wind from the west and a few clouds over the hills in the afternoon.
A good test model is small, fast and predictable. It loads in a moment, it produces the
same words for the same prompt when sampling is turned off, and it never stops early,
because the tests want to count the tokens that come back and check the reason why the
answer ended. When the prompt is too long for the context window, the runtime reports an
error instead of crashing, and the agent turns that error into a clear message.
The quick brown fox jumps over the lazy dog. Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
10, 42, 100 and 2024 appear in questions about time, money, distance and temperature.
Cameras, sensors and small computers work together at the edge of the network, where
the data is created, so that decisions can be made quickly and without a round trip to
a distant server. Questions: who, what, where, when, why and how? Answers: yes, no,
maybe, it depends. "Quotes", (parentheses), [brackets], {braces}; colons: and dashes -
all of them should survive a round trip through the tokenizer without any change.
"""


def train_tokenizer() -> Tokenizer:
    # Byte-level BPE (GPT-2 layout): every string round-trips and ORT GenAI's tokenizer
    # splits it the same way Hugging Face does, unlike a SentencePiece-style layout.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    # Added after training so they get the top ids, as in Phi-3 (32000+).
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def logit_bias(tok: Tokenizer) -> np.ndarray:
    # Keep random output readable and never-ending: allow only tokens that decode to
    # printable ASCII; special tokens (EOS included) and lone UTF-8 bytes are pushed out.
    bias = np.full(tok.get_vocab_size(), -1e4, dtype=np.float32)
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        if i not in special and text and text.isascii() and text.isprintable():
            bias[i] = 0.0
    return bias


class Graph:
    """Small helper to write a graph node by node (names double as output names)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.inits, self.nodes = rng, [], []

    def weight(self, name, shape, scale=None):
        scale = 1.0 / np.sqrt(shape[0]) if scale is None else scale
        data = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(data, name))
        return name

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, graph_name, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent")
        model.ir_version = 8  # opset 17 era; loads with any recent onnxruntime
        onnx.checker.check_model(model, full_check=True)
        return model


def decoder_graph(vocab: int, bias: np.ndarray, *, context: int,
                  inputs_embeds: bool = False) -> onnx.ModelProto:
    """The decoder graph; with `inputs_embeds=True` it takes `inputs_embeds` [B,S,HIDDEN]
    instead of `input_ids` (the text stage of a phi3v-style model, see tiny_phi3v.py).
    Its weights come from DECODER_SEED, so both recipes have the same decoder."""
    g = Graph(np.random.default_rng(DECODER_SEED))
    weight, const, node = g.weight, g.const, g.node

    def layer_norm(x, name):
        const(f"{name}.g", np.ones(HIDDEN, np.float32))
        const(f"{name}.b", np.zeros(HIDDEN, np.float32))
        return node("LayerNormalization", [x, f"{name}.g", f"{name}.b"], name, axis=-1)

    # Learned absolute positions instead of RoPE: simpler, and only the shapes matter here.
    tokens_in = "inputs_embeds" if inputs_embeds else "input_ids"
    tok_emb = (tokens_in if inputs_embeds
               else node("Gather", [weight("embed", [vocab, HIDDEN], 1.0), "input_ids"], "tok_emb"))
    x = node("Add", [tok_emb,
                     node("Gather", [weight("pos_embed", [context, HIDDEN], 0.5), "position_ids"], "pos_emb")], "h0")

    # Additive attention mask [B,1,S,T]: query i (cache slot T-S+i) sees slots <= itself
    # that the attention mask marks as real tokens (ORT GenAI pads on the left).
    const("one", np.int64(1))
    const("zero", np.int64(0))
    seq = node("Squeeze", [node("Shape", [tokens_in], "seq_1d", start=1, end=2)], "seq")
    total = node("Squeeze", [node("Shape", ["attention_mask"], "total_1d", start=1, end=2)], "total")
    q_pos = node("Range", [node("Sub", [total, seq], "past_len"), total, "one"], "q_pos")
    k_pos = node("Range", ["zero", total, "one"], "k_pos")
    const("ax0", np.array([0], np.int64))
    const("ax1", np.array([1], np.int64))
    const("ax12", np.array([1, 2], np.int64))
    causal = node("LessOrEqual", [node("Unsqueeze", [k_pos, "ax0"], "k_row"),
                                  node("Unsqueeze", [q_pos, "ax1"], "q_col")], "causal")
    padding = node("Unsqueeze", [node("Cast", ["attention_mask"], "mask_bool", to=TensorProto.BOOL), "ax12"], "pad")
    const("mask_on", np.float32(0.0))
    const("mask_off", np.float32(-1e4))
    mask = node("Where", [node("And", [causal, padding], "allowed"), "mask_on", "mask_off"], "mask")

    const("heads_shape", np.array([0, 0, HEADS, HEAD_SIZE], np.int64))
    const("hidden_shape", np.array([0, 0, HIDDEN], np.int64))
    const("scale", np.float32(1.0 / np.sqrt(HEAD_SIZE)))
    for i in range(LAYERS):
        p = f"l{i}"
        h = layer_norm(x, f"{p}.ln1")

        def project_heads(n):  # [B,S,HIDDEN] -> [B,HEADS,S,HEAD_SIZE], the KV-cache layout
            flat = node("MatMul", [h, weight(f"{p}.w{n}", [HIDDEN, HIDDEN])], f"{p}.{n}_flat")
            return node("Transpose", [node("Reshape", [flat, "heads_shape"], f"{p}.{n}_4d")], f"{p}.{n}", perm=[0, 2, 1, 3])

        q, k, v = project_heads("q"), project_heads("k"), project_heads("v")
        k = node("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        v = node("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        scores = node("MatMul", [q, node("Transpose", [k], f"{p}.kT", perm=[0, 1, 3, 2])], f"{p}.qk")
        scores = node("Add", [node("Mul", [scores, "scale"], f"{p}.qk_scaled"), mask], f"{p}.qk_masked")
        att = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.att")
        att = node("Reshape", [node("Transpose", [att], f"{p}.att_t", perm=[0, 2, 1, 3]), "hidden_shape"], f"{p}.att_flat")
        x = node("Add", [x, node("MatMul", [att, weight(f"{p}.wo", [HIDDEN, HIDDEN])], f"{p}.o")], f"{p}.h_att")
        up = node("MatMul", [layer_norm(x, f"{p}.ln2"), weight(f"{p}.w1", [HIDDEN, FFN])], f"{p}.up")
        act = node("Mul", [up, node("Sigmoid", [up], f"{p}.gate")], f"{p}.silu")
        x = node("Add", [x, node("MatMul", [act, weight(f"{p}.w2", [FFN, HIDDEN])], f"{p}.down")], f"{p}.h_out")

    const("logit_bias", bias)
    logits = node("MatMul", [layer_norm(x, "ln_f"), weight("lm_head", [HIDDEN, vocab])], "raw_logits")
    node("Add", [logits, "logit_bias"], "logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_shape = ["batch", HEADS, "past_seq", HEAD_SIZE]
    present_shape = ["batch", HEADS, "total_seq", HEAD_SIZE]
    tokens_info = (helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", HIDDEN]) if inputs_embeds
                   else helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]))
    inputs = [tokens_info,
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_seq"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", vocab])]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present_shape))
    return g.model("tiny_phi3", inputs, outputs)


def genai_config(vocab: int, eos_ids: list[int], *, model_type: str, context: int, decoder_file: str,
                 token_input: str, sessions: dict | None = None, search: dict | None = None) -> dict:
    """genai_config.json: the decoder takes `token_input` (input_ids or inputs_embeds);
    `sessions` (phi3v's embedding and vision) follow it, `search` adds search options."""
    return {
        "model": {
            "bos_token_id": eos_ids[0],
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": decoder_file,
                "head_size": HEAD_SIZE,
                "hidden_size": HIDDEN,
                "inputs": {
                    token_input: token_input,
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": HEADS,
                "num_hidden_layers": LAYERS,
                "num_key_value_heads": HEADS,
            },
            **(sessions or {}),
            "eos_token_id": eos_ids,
            "pad_token_id": eos_ids[0],
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Our graph concatenates past and new keys, so present grows each step.
            "past_present_share_buffer": False,
            **(search or {}),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_tokenizer_files(tok: Tokenizer, out_dir: Path, context: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the Phi-3 chat template), special_tokens_map.json."""
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": context,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }, indent=2))
