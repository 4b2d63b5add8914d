"""Synthetic checkpoints laid out exactly like Meta's LLaMA release, for tests and benchmarks.

``write_meta_checkpoint`` writes ``ROOT/tokenizer.model`` and ``ROOT/SIZE/{params.json, consolidated.NN.pth,
checklist.chk}`` with random weights split across model-parallel shards by fairscale's rules (see
:mod:`convert.keymap`), the replicated ``rope.freqs`` buffer and ``vocab_size: -1`` as Meta's params.json has it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from convert.keymap import KEYMAP

__all__ = ["write_meta_checkpoint", "meta_state_dict", "split_for_shards"]


def _ffn_dim(dim: int, multiple_of: int) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_state_dict(
    dim: int,
    n_layers: int,
    n_heads: int,
    vocab_size: int,
    multiple_of: int = 256,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """An unsharded LLaMA state dict with Meta's names and random weights (norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    ffn = _ffn_dim(dim, multiple_of)

    def rnd(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    sd = {"tok_embeddings.weight": rnd(vocab_size, dim, std=1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rnd(dim, dim)
        sd[p + "attention.wk.weight"] = rnd(dim, dim)
        sd[p + "attention.wv.weight"] = rnd(dim, dim)
        sd[p + "attention.wo.weight"] = rnd(dim, dim)
        sd[p + "feed_forward.w1.weight"] = rnd(ffn, dim)
        sd[p + "feed_forward.w2.weight"] = rnd(dim, ffn)
        sd[p + "feed_forward.w3.weight"] = rnd(ffn, dim)
        sd[p + "attention_norm.weight"] = rnd(dim, std=0.1, mean=1.0)
        sd[p + "ffn_norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["output.weight"] = rnd(vocab_size, dim)
    head_dim = dim // n_heads
    sd["rope.freqs"] = (1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(dtype)
    return sd


def _split_dim(name: str) -> int | None:
    short = name.split(".", 2)[2] if name.startswith("layers.") else name
    for spec in KEYMAP:
        if spec.meta.replace("layers.{i}.", "") == short:
            return spec.split_dim
    return None  # rope.freqs: replicated


def split_for_shards(sd: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split a full state dict into ``n_shards`` model-parallel shards the way fairscale stores them."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in sd.items():
        dim = _split_dim(name)
        parts = [tensor] * n_shards if dim is None else list(torch.chunk(tensor, n_shards, dim=dim))
        for k in range(n_shards):
            shards[k][name] = parts[k].clone()
    return shards


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_meta_checkpoint(
    root: str | Path,
    size: str,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_shards: int,
    tokenizer_model: str | Path,
    vocab_size: int | None = None,
    multiple_of: int = 256,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    params_vocab_size: int = -1,
) -> dict[str, torch.Tensor]:
    """Write a release-layout checkpoint under ``root`` and return its unsharded state dict.

    Args:
        root: release folder to create (``root/tokenizer.model``, ``root/size/...``).
        size: name of the model sub-folder (``7B`` or any name).
        dim, n_layers, n_heads: architecture; the FFN width follows Meta's rule with ``multiple_of``.
        n_shards: number of ``consolidated.NN.pth`` files.
        tokenizer_model: a SentencePiece model copied to ``root/tokenizer.model``; its size is the vocabulary
            unless ``vocab_size`` is given.
        params_vocab_size: value written to params.json (-1: "take it from the tokenizer", as Meta's).
    """
    import sentencepiece as spm

    root = Path(root)
    size_dir = root / size
    size_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_model, root / "tokenizer.model")
    if vocab_size is None:
        vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    sd = meta_state_dict(dim, n_layers, n_heads, vocab_size, multiple_of, dtype, seed)
    params = {
        "dim": dim,
        "multiple_of": multiple_of,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "norm_eps": 1e-06,
        "vocab_size": params_vocab_size,
    }
    (size_dir / "params.json").write_text(json.dumps(params))
    for k, shard in enumerate(split_for_shards(sd, n_shards)):
        torch.save(shard, size_dir / f"consolidated.{k:02d}.pth")
    names = ["params.json"] + [f"consolidated.{k:02d}.pth" for k in range(n_shards)]
    (size_dir / "checklist.chk").write_text("".join(f"{_md5(size_dir / n)}  {n}\n" for n in names))
    return sd
