"""Export a Hugging Face LLaMA folder to GGUF (llama.cpp's format) with the ``gguf`` package from PyPI.

    python -m convert.export_gguf --input_dir llama-7b-hf --output llama-7b.gguf [--outtype f16|bf16|f32|q8_0]

GGUF's ``llama`` architecture computes rotary embeddings on interleaved channel pairs, as Meta's code does, so
wq/wk are written in Meta's row order (the inverse of the HF permutation, :func:`convert.keymap.
permute_hf_to_meta`). Tensor and metadata names come from the ``gguf`` package's own tables (``MODEL_TENSOR``,
``TENSOR_NAMES``, ``GGUFWriter.add_*``); the vocabulary is the SentencePiece model's pieces, scores and types
(``tokenizer.ggml.model = llama``). Norm weights stay f32 (as llama.cpp expects); ``q8_0`` quantises the matrices
with the package's reference quantiser. Tensors go to a temporary file as they are produced, so memory holds one
tensor at a time. Read the result back with ``gguf.GGUFReader`` (the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from convert.common import ConversionError, atomic_output_dir
from convert.keymap import permute_hf_to_meta, tensor_plan

__all__ = ["export_gguf", "GGUF_NAMES", "main"]

# our (Meta) key-map short names -> gguf MODEL_TENSOR members
GGUF_NAMES = {
    "tok_embeddings.weight": "TOKEN_EMBD",
    "attention.wq.weight": "ATTN_Q",
    "attention.wk.weight": "ATTN_K",
    "attention.wv.weight": "ATTN_V",
    "attention.wo.weight": "ATTN_OUT",
    "feed_forward.w1.weight": "FFN_GATE",
    "feed_forward.w2.weight": "FFN_DOWN",
    "feed_forward.w3.weight": "FFN_UP",
    "attention_norm.weight": "ATTN_NORM",
    "ffn_norm.weight": "FFN_NORM",
    "norm.weight": "OUTPUT_NORM",
    "output.weight": "OUTPUT",
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_tensor_name(meta_name: str) -> str:
    import gguf

    if meta_name.startswith("layers."):
        _, index, short = meta_name.split(".", 2)
        member = getattr(gguf.MODEL_TENSOR, GGUF_NAMES[short])
        return gguf.TENSOR_NAMES[member].format(bid=int(index)) + ".weight"
    member = getattr(gguf.MODEL_TENSOR, GGUF_NAMES[meta_name])
    return gguf.TENSOR_NAMES[member] + ".weight"


def _vocabulary(tokenizer_model: Path) -> tuple[list[bytes], list[float], list[int], dict]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_model.read_bytes())
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # sentencepiece's piece types are gguf.TokenType's values
    spec = proto.trainer_spec
    return tokens, scores, types, {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}


def export_gguf(input_dir: str | Path, output: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write ``output`` (a .gguf file) from the HF folder ``input_dir``."""
    import gguf
    from safetensors import safe_open

    from modeling_llama import LlamaConfig

    input_dir, output = Path(input_dir), Path(output)
    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output}: exists; pass --overwrite to replace it")
    try:
        raw = json.loads((input_dir / "config.json").read_text())
        config = LlamaConfig.from_dict(raw)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ConversionError(f"{input_dir / 'config.json'}: not a readable LLaMA config ({e})") from None
    tokenizer_model = input_dir / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise ConversionError(f"{tokenizer_model}: not found; GGUF needs the SentencePiece vocabulary")
    tokens, scores, types, special = _vocabulary(tokenizer_model)
    if len(tokens) != config.vocab_size:
        raise ConversionError(
            f"{tokenizer_model} has {len(tokens)} pieces but config.json says vocab_size {config.vocab_size}"
        )
    index = input_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    handles = {}
    for name in files:
        h = safe_open(str(input_dir / name), framework="pt")
        for key in h.keys():  # noqa: SIM118 - not a mapping
            handles[key] = h

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with atomic_output_dir(output.parent / f".{output.name}.d", overwrite=True) as tmp:
        writer = gguf.GGUFWriter(tmp / output.name, "llama", use_temp_file=True)
        writer.add_name(input_dir.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(special["bos"])
        writer.add_eos_token_id(special["eos"])
        writer.add_unk_token_id(special["unk"])
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        for spec, meta, hf, shape in tensor_plan(config):
            if hf not in handles:
                raise ConversionError(f"{input_dir}: weight {hf} is missing")
            t = handles[hf].get_tensor(hf).float()
            if tuple(t.shape) != shape:
                raise ConversionError(f"{input_dir}: {hf} has shape {tuple(t.shape)}, config implies {shape}")
            if spec.rotary == "q":
                t = permute_hf_to_meta(t, config.num_attention_heads)
            elif spec.rotary == "k":
                t = permute_hf_to_meta(t, config.num_key_value_heads)
            name = gguf_tensor_name(meta)
            if t.dim() == 1 or outtype == "f32":
                writer.add_tensor(name, t.numpy().astype(np.float32))
            elif outtype == "f16":
                writer.add_tensor(name, t.numpy().astype(np.float16))
            elif outtype == "bf16":
                bits = t.to(torch.bfloat16).view(torch.int16).numpy()
                writer.add_tensor(name, bits, raw_shape=bits.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                data = gguf.quants.quantize(t.numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        output.parent.mkdir(parents=True, exist_ok=True)
        (tmp / output.name).replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert.export_gguf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input_dir", required=True, help="Hugging Face LLaMA folder (with tokenizer.model)")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="matrix dtype (norms stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        out = export_gguf(args.input_dir, args.output, args.outtype, args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
