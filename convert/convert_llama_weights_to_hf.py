"""Convert Meta's original LLaMA checkpoints to a Hugging Face folder, streaming, in bounded memory, atomically.

Input (Meta's release layout)::

    INPUT_DIR/tokenizer.model
    INPUT_DIR/SIZE/params.json           {"dim", "multiple_of", "n_heads", "n_layers", "norm_eps", "vocab_size"}
    INPUT_DIR/SIZE/consolidated.00.pth   model-parallel shards (1/2/4/8 for 7B/13B/33B/65B)
    INPUT_DIR/SIZE/checklist.chk         md5 sums (checked with --verify)

Output: sharded safetensors + index, config.json, generation_config.json, tokenizer.model/tokenizer.json/
tokenizer_config.json, a model card and the code files for ``trust_remote_code``. The folder loads in stock
transformers and in this project's classes with identical logits.

Memory: shards are memory-mapped (``torch.load(mmap=True, weights_only=True)``) and each output tensor is
merged, permuted, cast and streamed into a safetensors file whose header was planned from params.json, so the
anonymous memory in use is a couple of tensors, not the model (see benchmarks/convert_memory.py).

    python -m convert.convert_llama_weights_to_hf --input_dir llama --model_size 7B --output_dir llama-7b-hf
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from convert.common import DTYPES, ConversionError, atomic_output_dir, load_checkpoint, parse_size, verify_checklist
from convert.keymap import DROPPED_META_KEYS, KNOWN_SIZES, KeySpec, permute_meta_to_hf, tensor_plan
from convert.safetensors_stream import ShardedSafetensorsWriter, TensorSpec

__all__ = ["convert_llama_to_hf", "read_params", "config_from_params", "main"]

REQUIRED_PARAMS = {"dim": int, "n_heads": int, "n_layers": int, "norm_eps": (int, float), "vocab_size": int}
OPTIONAL_PARAMS = {
    "multiple_of": int,
    "n_kv_heads": (int, type(None)),
    "ffn_dim_multiplier": (int, float, type(None)),
    "rope_theta": (int, float),
    "max_seq_len": int,
    "max_batch_size": int,
}
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def read_params(path: Path) -> dict:
    """Read and validate params.json; errors name the file and the field."""
    if not path.is_file():
        raise ConversionError(f"{path}: not found (every model folder of Meta's release holds a params.json)")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(params).__name__}")
    for key, kind in REQUIRED_PARAMS.items():
        if key not in params:
            raise ConversionError(f"{path}: missing required field {key!r}")
        if not isinstance(params[key], kind) or isinstance(params[key], bool):
            raise ConversionError(f"{path}: field {key!r} has the wrong type ({params[key]!r})")
    for key, kind in OPTIONAL_PARAMS.items():
        if key in params and (not isinstance(params[key], kind) or isinstance(params[key], bool)):
            raise ConversionError(f"{path}: field {key!r} has the wrong type ({params[key]!r})")
    unknown = set(params) - set(REQUIRED_PARAMS) - set(OPTIONAL_PARAMS)
    if unknown:
        raise ConversionError(f"{path}: unknown field(s) {sorted(unknown)}; is this a LLaMA-1 params.json?")
    return params


def config_from_params(params: dict, vocab_size: int, max_position_embeddings: int = 2048, source: str = ""):
    """The :class:`LlamaConfig` of a params.json (``vocab_size`` already resolved from the tokenizer if -1)."""
    from modeling_llama import LlamaConfig

    try:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=params["dim"],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            rms_norm_eps=float(params["norm_eps"]),
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            max_position_embeddings=params.get("max_seq_len", max_position_embeddings),
            rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        )
    except ValueError as e:
        raise ConversionError(f"{source or 'params.json'}: does not describe a valid LLaMA: {e}") from None


def find_shards(size_dir: Path, model_size: str) -> list[Path]:
    """consolidated.00.pth ... in order; checks numbering, and the count against Meta's release when known."""
    found = {}
    for path in size_dir.iterdir():
        m = SHARD_RE.match(path.name)
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise ConversionError(f"{size_dir}: no consolidated.NN.pth shard files found")
    n = max(found) + 1
    checklist = size_dir / "checklist.chk"
    if checklist.is_file():  # Meta's md5 list names every shard of the release
        for line in checklist.read_text().splitlines():
            m = SHARD_RE.match(line.split()[-1]) if line.strip() else None
            if m and not (size_dir / m.group(0)).is_file():
                raise ConversionError(f"{size_dir / m.group(0)}: missing (listed in checklist.chk)")
            if m:
                n = max(n, int(m.group(1)) + 1)
    for k in range(n):
        if k not in found:
            raise ConversionError(f"{size_dir / f'consolidated.{k:02d}.pth'}: missing shard {k} of {n}")
    known = KNOWN_SIZES.get(model_size.upper())
    if known is not None and known[3] != n:
        raise ConversionError(
            f"{size_dir}: LLaMA-{model_size.upper()} is released as {known[3]} shard(s) but {n} were found; "
            "a shard is missing or the folder holds another model"
        )
    return [found[k] for k in range(n)]


def _tokenizer_vocab_size(path: Path) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path}: not a SentencePiece model ({e})") from None


def _merge(spec: KeySpec, meta_name: str, shape: tuple[int, ...], shards: list[dict], files: list[Path]):
    """Gather one tensor from the model-parallel shards (fairscale split rules), checking every slice's shape."""
    n = len(shards)
    if spec.split_dim is None:
        expected = shape
    else:
        if shape[spec.split_dim] % n:
            raise ConversionError(
                f"{meta_name}: dimension {spec.split_dim} of size {shape[spec.split_dim]} cannot be split "
                f"into {n} shards; the shards do not match params.json"
            )
        expected = tuple(s // n if k == spec.split_dim else s for k, s in enumerate(shape))
    parts = []
    for shard, path in zip(shards, files):
        if meta_name not in shard:
            raise ConversionError(f"{path}: tensor {meta_name!r} is missing")
        t = shard[meta_name]
        if tuple(t.shape) != expected:
            raise ConversionError(
                f"{path}: tensor {meta_name!r} has shape {tuple(t.shape)}, expected {expected} "
                f"(from params.json and {n} shard(s))"
            )
        parts.append(t)
    if spec.split_dim is None:
        return parts[0]  # replicated: every shard holds the same tensor
    return torch.cat(parts, dim=spec.split_dim)


def convert_llama_to_hf(
    input_dir: str | Path,
    model_size: str,
    output_dir: str | Path,
    dtype: str = "float16",
    max_shard_size: int | str = "5GB",
    verify: bool = False,
    overwrite: bool = False,
    max_position_embeddings: int = 2048,
    tokenizer_path: str | Path | None = None,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert ``input_dir/model_size`` (Meta layout) into the Hub folder ``output_dir``; see the module doc.

    Args:
        input_dir: release folder holding ``tokenizer.model`` and the ``model_size`` sub-folder.
        model_size: ``7B``, ``13B``, ``30B``/``33B``, ``65B`` or the name of any sub-folder holding params.json.
        output_dir: folder to create (must be empty or absent unless ``overwrite``).
        dtype: weights dtype of the output (``float16`` as released, ``bfloat16`` or ``float32``).
        max_shard_size: bytes per safetensors file (``"5GB"``, ``"500MB"`` ...).
        verify: check md5 sums against ``checklist.chk`` first.
        overwrite: replace a non-empty ``output_dir``.
        max_position_embeddings: context length when params.json does not say (2048 for LLaMA-1).
        tokenizer_path: tokenizer.model to use instead of ``input_dir/tokenizer.model``.
        push_to_hub: repository id to upload the finished folder to.
        progress: show progress bars.
    """
    from transformers import GenerationConfig

    import modeling_llama
    from modeling_llama import LlamaTokenizerFast
    from modeling_llama.modeling_llama import AUTO_MAP, model_card, push_folder_to_hub

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"{input_dir}: input folder not found")
    size_dir = input_dir / model_size
    if not size_dir.is_dir():
        available = sorted(p.name for p in input_dir.iterdir() if (p / "params.json").is_file())
        raise ConversionError(
            f"{size_dir}: no such model folder; --model_size must be 7B, 13B, 30B, 33B, 65B or a sub-folder of "
            f"{input_dir} holding params.json (found: {', '.join(available) or 'none'})"
        )
    params = read_params(size_dir / "params.json")
    tokenizer_file = Path(tokenizer_path) if tokenizer_path else input_dir / "tokenizer.model"
    if not tokenizer_file.is_file() and tokenizer_path is None and (size_dir / "tokenizer.model").is_file():
        tokenizer_file = size_dir / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise ConversionError(f"{tokenizer_file}: tokenizer.model not found (pass --tokenizer_path)")
    known = KNOWN_SIZES.get(model_size.upper())
    if known is not None and (params["dim"], params["n_heads"], params["n_layers"]) != known[:3]:
        raise ConversionError(
            f"{size_dir / 'params.json'}: dim/n_heads/n_layers = {params['dim']}/{params['n_heads']}/"
            f"{params['n_layers']} do not match LLaMA-{model_size.upper()} ({known[0]}/{known[1]}/{known[2]})"
        )
    files = find_shards(size_dir, model_size)
    if verify:
        verify_checklist(size_dir)

    tok_vocab = _tokenizer_vocab_size(tokenizer_file)
    vocab_size = params["vocab_size"] if params["vocab_size"] > 0 else tok_vocab
    config = config_from_params(params, vocab_size, max_position_embeddings, source=str(size_dir / "params.json"))
    shards = [load_checkpoint(f) for f in files]

    plan = tensor_plan(config)
    expected_keys = {meta for _, meta, _, _ in plan}
    for shard, path in zip(shards, files):
        unexpected = set(shard) - expected_keys - set(DROPPED_META_KEYS)
        if unexpected:
            raise ConversionError(f"{path}: unexpected tensor(s) {sorted(unexpected)[:5]} for a LLaMA checkpoint")
        missing = expected_keys - set(shard)
        if missing:
            raise ConversionError(f"{path}: missing tensor(s) {sorted(missing)[:5]}")
    emb_rows = shards[0]["tok_embeddings.weight"].shape[0]
    if emb_rows != vocab_size:
        raise ConversionError(
            f"{files[0]}: tok_embeddings has {emb_rows} rows but the vocabulary size is {vocab_size} "
            f"({'params.json' if params['vocab_size'] > 0 else tokenizer_file.name})"
        )

    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        specs = [TensorSpec(hf, shape, torch_dtype) for _, _, hf, shape in plan]
        writer = ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
        try:
            with tqdm(
                total=writer.total_size,
                unit="B",
                unit_scale=True,
                desc=f"converting {model_size}",
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                for spec, meta_name, hf_name, shape in plan:
                    tensor = _merge(spec, meta_name, shape, shards, files)
                    if spec.rotary == "q":
                        tensor = permute_meta_to_hf(tensor, config.num_attention_heads)
                    elif spec.rotary == "k":
                        tensor = permute_meta_to_hf(tensor, config.num_key_value_heads)
                    tensor = tensor.to(torch_dtype)
                    writer.write(hf_name, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor
            writer.finish()
        finally:
            writer.close()

        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch_dtype
        config.auto_map = dict(AUTO_MAP)
        config.save_pretrained(tmp)
        code = Path(modeling_llama.modeling_llama.__file__).parent
        # the model file and its relative imports (what save_pretrained copies for trust_remote_code)
        for name in ("modeling_llama.py", "linear_cross_entropy.py", "cpu_linear.py", "native_build.py"):
            shutil.copyfile(code / name, tmp / name)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0
        ).save_pretrained(tmp)
        LlamaTokenizerFast(vocab_file=str(tokenizer_file)).save_pretrained(tmp)
        n_params = config.num_parameters()
        source = (
            f"\nConverted from Meta's original `{model_size}` checkpoint ({len(files)} shard(s)) with "
            "`python -m convert.convert_llama_weights_to_hf`.\n"
        )
        (tmp / "README.md").write_text(model_card(config, n_params, torch_dtype, source=source), encoding="utf-8")
    out = Path(output_dir)
    n = config.num_parameters()
    print(
        f"wrote {out} ({n / 1e9:.2f}B parameters, {dtype})"
        if n >= 1e9
        else f"wrote {out} ({n / 1e6:.1f}M parameters, {dtype})",
        file=sys.stderr,
    )
    if push_to_hub:
        push_folder_to_hub(out, push_to_hub, commit_message=f"Upload LLaMA-{model_size} converted from Meta's release")
        print(f"pushed {out} to {push_to_hub}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert.convert_llama_weights_to_hf",
        description="Convert Meta's LLaMA checkpoint (params.json + consolidated.NN.pth + tokenizer.model) into a "
        "Hugging Face folder (sharded safetensors, config, tokenizer, code for trust_remote_code), streaming "
        "layer by layer in bounded memory; the output appears only once complete.",
    )
    p.add_argument("--input_dir", required=True, help="release folder holding tokenizer.model and SIZE/")
    p.add_argument(
        "--model_size",
        required=True,
        help="7B, 13B, 30B (=33B), 65B, or the name of a sub-folder of input_dir holding params.json",
    )
    p.add_argument("--output_dir", required=True, help="Hub folder to write (created atomically)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="output dtype (default: float16)")
    p.add_argument("--max_shard_size", default="5GB", help="size of each safetensors file (default: 5GB)")
    p.add_argument("--verify", action="store_true", help="check md5 sums against checklist.chk first")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--max_position_embeddings", type=int, default=2048, help="context length (default 2048)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model (default: INPUT_DIR/tokenizer.model)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the result to this Hub repo")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    try:
        convert_llama_to_hf(
            args.input_dir,
            args.model_size,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            verify=args.verify,
            overwrite=args.overwrite,
            max_position_embeddings=args.max_position_embeddings,
            tokenizer_path=args.tokenizer_path,
            push_to_hub=args.push_to_hub,
            progress=not args.no_progress,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
