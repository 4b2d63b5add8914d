"""Meta's LLaMA checkpoint layout <-> HF weight names: the one table, the split rules and the RoPE permutation.

Meta's ``consolidated.NN.pth`` files are the model-parallel shards written by fairscale:

- ``ColumnParallelLinear`` (wq, wk, wv, w1, w3, output) is split along dim 0 (output features);
- ``RowParallelLinear`` (wo, w2) along dim 1 (input features);
- ``ParallelEmbedding`` (tok_embeddings) along dim 1 (the embedding dimension);
- the RMSNorm weights are replicated, and so is the ``rope.freqs`` buffer (dropped: HF recomputes it).

Rotary embeddings. Meta's code rotates interleaved channel pairs (2i, 2i+1) as complex numbers; HF's
``rotate_half`` pairs channel i with i + head_dim/2. The two compute the same function once the rows of wq and wk
are permuted within each head: row ``2i + j`` (j in {0, 1}) of Meta's head goes to row ``j * head_dim/2 + i``.
Skipping the permutation (or applying it twice) yields a model that produces fluent-looking gibberish.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "KEYMAP",
    "DROPPED_META_KEYS",
    "KNOWN_SIZES",
    "KeySpec",
    "meta_layer_keys",
    "tensor_plan",
    "permute_meta_to_hf",
    "permute_hf_to_meta",
]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One tensor: its Meta and HF names (``{i}`` = layer index), fairscale split dim, and rotary permutation.

    Attributes:
        meta: Meta name pattern.
        hf: HF name pattern.
        split_dim: dimension along which model-parallel shards were split, ``None`` if replicated.
        rotary: ``"q"`` or ``"k"`` for the projections whose rows must be permuted, else ``None``.
        per_layer: whether the pattern holds ``{i}``.
    """

    meta: str
    hf: str
    split_dim: int | None
    rotary: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.meta


KEYMAP: tuple[KeySpec, ...] = (
    KeySpec("tok_embeddings.weight", "model.embed_tokens.weight", split_dim=1),
    KeySpec("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", 0, rotary="q"),
    KeySpec("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", 0, rotary="k"),
    KeySpec("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", 0),
    KeySpec("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", 1),
    KeySpec("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", 0),
    KeySpec("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", 1),
    KeySpec("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", 0),
    KeySpec("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    KeySpec("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    KeySpec("norm.weight", "model.norm.weight", None),
    KeySpec("output.weight", "lm_head.weight", 0),
)
DROPPED_META_KEYS = ("rope.freqs",)

# Meta's release: folder name -> (dim, n_heads, n_layers, number of consolidated.NN.pth shards).
KNOWN_SIZES: dict[str, tuple[int, int, int, int]] = {
    "7B": (4096, 32, 32, 1),
    "13B": (5120, 40, 40, 2),
    "30B": (6656, 52, 60, 4),
    "33B": (6656, 52, 60, 4),
    "65B": (8192, 64, 80, 8),
}


def meta_layer_keys(i: int) -> list[tuple[KeySpec, str, str]]:
    """(spec, meta name, hf name) for every tensor of decoder layer ``i``."""
    return [(s, s.meta.format(i=i), s.hf.format(i=i)) for s in KEYMAP if s.per_layer]


def tensor_plan(config) -> list[tuple[KeySpec, str, str, tuple[int, ...]]]:
    """Every tensor of a LLaMA with ``config`` in checkpoint order: (spec, Meta name, HF name, full shape).

    Order: embeddings, then layer by layer, then the final norm and the output projection, so that a converter
    streaming this list holds one layer's tensors at a time.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {
        "tok_embeddings.weight": (v, d),
        "attention.wq.weight": (d, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, d),
        "feed_forward.w1.weight": (f, d),
        "feed_forward.w2.weight": (d, f),
        "feed_forward.w3.weight": (f, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "norm.weight": (d,),
        "output.weight": (v, d),
    }
    first = [s for s in KEYMAP if s.meta == "tok_embeddings.weight"]
    layer = [s for s in KEYMAP if s.per_layer]
    last = [s for s in KEYMAP if not s.per_layer and s.meta != "tok_embeddings.weight"]
    plan = [(s, s.meta, s.hf, shapes[s.meta]) for s in first]
    for i in range(config.num_hidden_layers):
        plan += [(s, s.meta.format(i=i), s.hf.format(i=i), shapes[s.meta.split("{i}.", 1)[1]]) for s in layer]
    plan += [(s, s.meta, s.hf, shapes[s.meta]) for s in last]
    return plan


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved rotary pairs to HF's half-split layout, per head."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    # (H, Dh/2, 2, D) -> (H, 2, Dh/2, D): pair member j of pair i moves to row j*Dh/2 + i of its head
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_meta_to_hf`."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    # (H, 2, Dh/2, D) -> (H, Dh/2, 2, D)
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)
