"""Convert a Hugging Face LLaMA folder back to Meta's original layout, one tensor at a time.

Output (the layout ``convert_llama_weights_to_hf`` reads)::

    OUTPUT_DIR/tokenizer.model
    OUTPUT_DIR/SIZE/params.json
    OUTPUT_DIR/SIZE/consolidated.00.pth ... consolidated.{N-1}.pth   split the fairscale way (see convert.keymap)
    OUTPUT_DIR/SIZE/checklist.chk

Meta -> HF -> Meta and HF -> Meta -> HF reproduce every weight bit for bit. Works for folders written by this
project and by stock transformers (``model_type: llama``).

    python -m convert.convert_hf_to_llama --input_dir llama-7b-hf --output_dir llama --num_shards 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from convert.common import DTYPES, ConversionError, atomic_output_dir
from convert.keymap import KNOWN_SIZES, KeySpec, permute_hf_to_meta, tensor_plan
from convert.torch_stream import StreamingTorchSave

__all__ = ["convert_hf_to_llama", "main"]


def _open_weights(folder: Path) -> dict[str, tuple[Path, object]]:
    """name -> (file, open safetensors handle), for a single file or an indexed set of shards."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json found")
    handles = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConversionError(f"{path}: listed in the index but missing")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
            handles[key] = (path, handle)
    return handles


def _size_name(config) -> str:
    for name, (dim, heads, layers, _) in KNOWN_SIZES.items():
        if (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (dim, heads, layers):
            return "30B" if name == "33B" else name
    return "custom"


def convert_hf_to_llama(
    input_dir: str | Path,
    output_dir: str | Path,
    num_shards: int = 1,
    model_size: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write Meta's layout of the HF folder ``input_dir`` under ``output_dir``; return the model sub-folder.

    Args:
        input_dir: HF folder (config.json, safetensors, tokenizer.model).
        output_dir: release-style folder to create.
        num_shards: number of model-parallel shards (Meta used 1/2/4/8 for 7B/13B/33B/65B).
        model_size: name of the model sub-folder (default: 7B/13B/30B/65B when the shape matches, else custom).
        dtype: cast weights to ``float16``/``bfloat16``/``float32`` (default: keep the folder's dtype).
        overwrite: replace a non-empty ``output_dir``.
        progress: show a progress bar.
    """
    from modeling_llama import LlamaConfig, llama_ffn_dim

    input_dir = Path(input_dir)
    config_path = input_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: not found; --input_dir must be a Hugging Face model folder")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    if raw.get("model_type") != "llama":
        raise ConversionError(f"{config_path}: model_type is {raw.get('model_type')!r}, not 'llama'")
    try:
        config = LlamaConfig.from_dict(raw)
    except ValueError as e:
        raise ConversionError(f"{config_path}: not a LLaMA-1 configuration: {e}") from None
    if num_shards < 1:
        raise ConversionError(f"--num_shards must be >= 1, got {num_shards}")
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    for what, size in (("hidden_size", d), ("intermediate_size", f), ("vocab_size", v), ("key/value width", kv)):
        if size % num_shards:
            raise ConversionError(f"{config_path}: {what} {size} is not divisible by --num_shards {num_shards}")
    if llama_ffn_dim(d, config.multiple_of, config.ffn_dim_multiplier) != f:
        raise ConversionError(
            f"{config_path}: intermediate_size {f} is not what Meta's code derives from dim {d} and "
            f"multiple_of {config.multiple_of}; params.json cannot express this model"
        )
    if config.tie_word_embeddings:
        raise ConversionError(f"{config_path}: tied embeddings cannot be expressed in Meta's layout")
    tokenizer = input_dir / "tokenizer.model"
    if not tokenizer.is_file():
        raise ConversionError(f"{tokenizer}: not found; Meta's layout needs the SentencePiece tokenizer.model")

    import sentencepiece as spm

    tok_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    weights = _open_weights(input_dir)
    ref_dtype = (
        weights["model.embed_tokens.weight"][1].get_slice("model.embed_tokens.weight").get_dtype()
        if "model.embed_tokens.weight" in weights
        else None
    )
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype else {"F16": torch.float16, "BF16": torch.bfloat16}.get(ref_dtype, torch.float32)

    order = tensor_plan(config)
    missing = [hf for _, _, hf, _ in order if hf not in weights]
    if missing:
        raise ConversionError(f"{input_dir}: missing weight(s) {missing[:5]}")
    unexpected = sorted(set(weights) - {hf for _, _, hf, _ in order} - {"model.rotary_emb.inv_freq"})
    if unexpected:
        raise ConversionError(f"{input_dir}: unexpected weight(s) {unexpected[:5]} for a LLaMA-1 model")

    size = model_size or _size_name(config)
    head_dim = config.head_dim
    rope = (1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(out_dtype)

    def shard_shape(spec: KeySpec, shape: tuple[int, ...]) -> tuple[int, ...]:
        if spec.split_dim is None:
            return shape
        return tuple(s // num_shards if k == spec.split_dim else s for k, s in enumerate(shape))

    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        size_dir = tmp / size
        size_dir.mkdir()
        specs = {meta: (shard_shape(spec, shape), out_dtype) for spec, meta, _, shape in order}
        specs["rope.freqs"] = (tuple(rope.shape), out_dtype)
        writers = [StreamingTorchSave(size_dir / f"consolidated.{k:02d}.pth", specs) for k in range(num_shards)]
        try:
            total = (
                sum(torch.Size(shape).numel() for _, _, _, shape in order)
                * torch.empty((), dtype=out_dtype).element_size()
            )
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="writing Meta shards",
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                for spec, meta, hf, shape in order:
                    path, handle = weights[hf]
                    tensor = handle.get_tensor(hf)
                    if tuple(tensor.shape) != shape:
                        raise ConversionError(
                            f"{path}: {hf} has shape {tuple(tensor.shape)}, config.json implies {shape}"
                        )
                    tensor = tensor.to(out_dtype)
                    if spec.rotary == "q":
                        tensor = permute_hf_to_meta(tensor, config.num_attention_heads)
                    elif spec.rotary == "k":
                        tensor = permute_hf_to_meta(tensor, config.num_key_value_heads)
                    parts = (
                        [tensor] * num_shards
                        if spec.split_dim is None
                        else torch.chunk(tensor, num_shards, spec.split_dim)
                    )
                    for writer, part in zip(writers, parts):
                        writer.write(meta, part)
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor, parts
            for writer in writers:
                writer.write("rope.freqs", rope)
                writer.finish()
        finally:
            for writer in writers:
                writer.close()

        params = {
            "dim": d,
            "multiple_of": config.multiple_of,
            "n_heads": config.num_attention_heads,
            "n_layers": config.num_hidden_layers,
            "norm_eps": config.rms_norm_eps,
            "vocab_size": -1 if tok_size == v else v,
        }
        if config.num_key_value_heads != config.num_attention_heads:
            params["n_kv_heads"] = config.num_key_value_heads
        if config.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = config.ffn_dim_multiplier
        if config.rope_theta != 10000.0:
            params["rope_theta"] = config.rope_theta
        (size_dir / "params.json").write_text(json.dumps(params))
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        lines = []
        for name in ["params.json"] + [f"consolidated.{k:02d}.pth" for k in range(num_shards)]:
            h = hashlib.md5()
            with (size_dir / name).open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(block)
            lines.append(f"{h.hexdigest()}  {name}\n")
        (size_dir / "checklist.chk").write_text("".join(lines))
    out = Path(output_dir) / size
    print(f"wrote {out} ({num_shards} shard(s), {str(out_dtype).replace('torch.', '')})", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert.convert_hf_to_llama",
        description="Convert a Hugging Face LLaMA folder to Meta's original layout (params.json, "
        "consolidated.NN.pth split the fairscale way, tokenizer.model, checklist.chk), one tensor at a time.",
    )
    p.add_argument("--input_dir", required=True, help="Hugging Face model folder")
    p.add_argument("--output_dir", required=True, help="release-style folder to create")
    p.add_argument("--num_shards", type=int, default=1, help="model-parallel shards (Meta: 1/2/4/8 for 7B/13B/33B/65B)")
    p.add_argument("--model_size", default=None, help="name of the model sub-folder (default: from the shape)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast the weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        convert_hf_to_llama(
            args.input_dir,
            args.output_dir,
            num_shards=args.num_shards,
            model_size=args.model_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
