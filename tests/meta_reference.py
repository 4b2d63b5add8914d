"""An independent forward pass written the way Meta's llama_v1 ``model.py`` computes it.

Weights are in Meta's layout and names (``tok_embeddings``, ``layers.N.attention.wq`` ...), rotary embeddings
multiply *interleaved* channel pairs as complex numbers, and the causal mask is additive -inf. Nothing here is
shared with the project's model code: it is the paper's model, used as an outside reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_meta_weights(dim: int, n_layers: int, n_heads: int, vocab: int, ffn: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {"tok_embeddings.weight": w(vocab, dim, std=1.0), "norm.weight": 1 + w(dim), "output.weight": w(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            sd[p + f"attention.{name}.weight"] = w(dim, dim)
        sd[p + "feed_forward.w1.weight"] = w(ffn, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, ffn)
        sd[p + "feed_forward.w3.weight"] = w(ffn, dim)
        sd[p + "attention_norm.weight"] = 1 + w(dim)
        sd[p + "ffn_norm.weight"] = 1 + w(dim)
    return sd


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved-pair rows -> HF half-split rows (the permutation documented in shared/FACTS.md)."""
    dim_out, dim_in = w.shape
    return w.view(n_heads, dim_out // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def meta_to_hf_state_dict(sd: dict, n_layers: int, n_heads: int) -> dict:
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = permute_for_hf(sd[m + "attention.wq.weight"], n_heads)
        out[h + "self_attn.k_proj.weight"] = permute_for_hf(sd[m + "attention.wk.weight"], n_heads)
        out[h + "self_attn.v_proj.weight"] = sd[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[m + "feed_forward.w1.weight"]
        out[h + "mlp.down_proj.weight"] = sd[m + "feed_forward.w2.weight"]
        out[h + "mlp.up_proj.weight"] = sd[m + "feed_forward.w3.weight"]
        out[h + "input_layernorm.weight"] = sd[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "ffn_norm.weight"]
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end).float()
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(t, freqs))  # complex64 (T, Dh/2)


def _apply_rotary(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # pairs (2i, 2i+1)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    return torch.view_as_real(xq_ * fc).flatten(3).type_as(xq), torch.view_as_real(xk_ * fc).flatten(3).type_as(xk)


@torch.no_grad()
def meta_forward(sd: dict, tokens: torch.Tensor, n_layers: int, n_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Logits (B, T, V) of Meta's Transformer.forward for ``tokens`` (B, T), computed for every position."""
    bsz, seqlen = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    dim = h.shape[-1]
    head_dim = dim // n_heads
    freqs_cis = _freqs_cis(head_dim, seqlen)
    mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf")), diagonal=1)
    for i in range(n_layers):
        p = f"layers.{i}."
        x = _rms_norm(h, sd[p + "attention_norm.weight"], eps)
        xq = (x @ sd[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, head_dim)
        xk = (x @ sd[p + "attention.wk.weight"].T).view(bsz, seqlen, n_heads, head_dim)
        xv = (x @ sd[p + "attention.wv.weight"].T).view(bsz, seqlen, n_heads, head_dim)
        xq, xk = _apply_rotary(xq, xk, freqs_cis)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        scores = xq @ xk.transpose(2, 3) / math.sqrt(head_dim) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = (scores @ xv).transpose(1, 2).reshape(bsz, seqlen, dim)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = _rms_norm(h, sd[p + "ffn_norm.weight"], eps)
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[
            p + "feed_forward.w2.weight"
        ].T
        h = h + ff
    h = _rms_norm(h, sd["norm.weight"], eps)
    return (h @ sd["output.weight"].T).float()
