"""``attn_implementation="blocked_causal"``: exact attention that skips the blocks a causal mask hides.

Checked against stock transformers' Llama (SDPA) and against each document run alone: sequence lengths that
cross several 64-row blocks and end mid-block, padding, packing, GQA, the KV cache (dynamic and static) and
gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import twin_models

from modeling_llama.modeling_llama import BLOCKED_CAUSAL


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1.0)


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}], ids=["mha", "gqa"])
def test_logits_and_gradients_match_stock(overrides):
    ours, stock = twin_models(seed=11, max_position_embeddings=256, **overrides)
    ours.set_attn_implementation(BLOCKED_CAUSAL)
    assert ours.config._attn_implementation == BLOCKED_CAUSAL
    ids = torch.randint(3, 512, (2, 150))  # 3 blocks, the last one partial
    with torch.no_grad():
        assert _rel_err(ours(ids).logits, stock(ids).logits) < 1e-5
    ours.train()
    stock.train()
    ours(ids, labels=ids).loss.backward()
    stock(ids, labels=ids).loss.backward()
    grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel_err(p.grad, grads[name].grad) < 1e-4, name


def test_padding_and_packing_equal_each_row_alone():
    ours, stock = twin_models(seed=12, max_position_embeddings=256)
    ours.set_attn_implementation(BLOCKED_CAUSAL)
    rows = [torch.randint(3, 512, (n,)) for n in (70, 130)]
    width = 130
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, width - 70 :], mask[0, width - 70 :] = rows[0], 1  # left padding: 60 fully masked rows
    ids[1], mask[1] = rows[1], 1
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits
        assert torch.isfinite(padded).all()  # fully masked padding rows give no NaN
        packed = ours(torch.cat(rows)[None], position_ids=torch.cat([torch.arange(70), torch.arange(130)])[None])
        for i, r in enumerate(rows):
            alone = stock(r[None]).logits[0]
            assert _rel_err(padded[i, width - len(r) :], alone) < 1e-4
            start = 0 if i == 0 else 70
            assert _rel_err(packed.logits[0, start : start + len(r)], alone) < 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_stock(cache):
    ours, stock = twin_models(seed=13, max_position_embeddings=256)
    ours.set_attn_implementation(BLOCKED_CAUSAL)
    prompt = torch.randint(3, 512, (2, 90))  # prefill crosses a block boundary, then one-row steps
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation=cache)
    assert torch.equal(ours.generate(prompt, **kw), stock.generate(prompt, **kw))


def test_bf16_close_to_eager():
    ours, _ = twin_models(seed=14, max_position_embeddings=256)
    ours = ours.to(torch.bfloat16)
    ids = torch.randint(3, 512, (1, 100))
    with torch.no_grad():
        ours.set_attn_implementation("eager")
        eager = ours(ids).logits
        ours.set_attn_implementation(BLOCKED_CAUSAL)
        blocked = ours(ids).logits
    assert blocked.dtype == torch.bfloat16
    assert _rel_err(blocked, eager) < 3e-2
