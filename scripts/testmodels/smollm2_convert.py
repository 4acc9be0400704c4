"""Turn SmolLM2's quantized GGUF into what the ORT GenAI builder can read.

Runs inside the build venv (torch, transformers, gguf), not the project venv:

    python smollm2_convert.py SRC.gguf CONFIG_DIR F32.gguf

The builder reads GGUF tensors only as floats and needs a local Hugging Face
config/tokenizer folder (no hub here), so we write both.
"""

import sys
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoConfig, AutoTokenizer


def log(msg: str) -> None:
    print(f"[smollm2-convert] {msg}", file=sys.stderr, flush=True)


def write_config(src: Path, config_dir: Path) -> None:
    kw = {"gguf_file": src.name}
    config = AutoConfig.from_pretrained(src.parent, **kw)
    # The GGUF loader leaves this empty; the builder dispatches on it.
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(config_dir)
    AutoTokenizer.from_pretrained(src.parent, **kw).save_pretrained(config_dir)


def dequantize(src: Path, dst: Path) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    # Copy metadata (the builder reads hyper-parameters from the config dir,
    # but keep the file a faithful GGUF anyway); skip keys the writer sets itself.
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    src, config_dir, dst = map(Path, sys.argv[1:4])
    log("writing config and tokenizer")
    write_config(src, config_dir)
    log("dequantizing GGUF to float32")
    dequantize(src, dst)


if __name__ == "__main__":
    main()
