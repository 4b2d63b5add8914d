"""The LM head fused with its cross-entropy (``return_logits=False``) against ``F.cross_entropy`` on explicit logits
and against stock transformers' loss: several chunks (the last one partial), ignored targets, ``num_items_in_batch``,
bf16 autocast, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import twin_models

import modeling_llama.linear_cross_entropy as lce


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "_CHUNK_LOGITS", 7 * 300)  # 7 rows per chunk for V=300: 57 rows = 8 full + 1 partial


def _inputs(seed=0, n=57, d=24, v=300):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return h, w, t


@pytest.mark.parametrize("num_items", [None, 123])
def test_matches_cross_entropy_on_logits(small_chunks, num_items):
    h, w, t = _inputs()
    if num_items is None:
        ref = F.cross_entropy(h @ w.T, t)
    else:
        ref = F.cross_entropy(h @ w.T, t, reduction="sum") / num_items
    ref_h, ref_w = torch.autograd.grad(ref * 3.0, (h, w))  # a non-unit upstream gradient
    loss = lce.linear_cross_entropy(h, w, t, num_items_in_batch=num_items)
    got_h, got_w = torch.autograd.grad(loss * 3.0, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    assert got_h[::5].abs().max() == 0  # ignored rows get no gradient


def test_no_grad_and_frozen_weight(small_chunks):
    h, w, t = _inputs(seed=2)
    ref = F.cross_entropy(h @ w.T, t)
    with torch.no_grad():
        torch.testing.assert_close(lce.linear_cross_entropy(h, w, t), ref, rtol=1e-6, atol=1e-6)
    frozen = w.detach()  # e.g. LoRA: the head is frozen, only the hidden states need a gradient
    (got_h,) = torch.autograd.grad(lce.linear_cross_entropy(h, frozen, t), (h,))
    (ref_h,) = torch.autograd.grad(ref, (h,))
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_close_to_float32_loss_of_bf16_logits(small_chunks):
    h, w, t = _inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.T).float(), t)  # stock: bf16 logits, loss in float32
        loss = lce.linear_cross_entropy(h, w, t)
    assert loss.dtype == torch.float32
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    got_h, got_w = torch.autograd.grad(loss, (h, w))
    assert got_h.dtype == got_w.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for got, want in ((got_h, ref_h), (got_w, ref_w)):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_model_loss_and_gradients_equal_stock(small_chunks):
    ours, stock = twin_models(seed=21)
    ours.train()
    stock.train()
    ids = torch.randint(3, 512, (3, 41))
    labels = ids.clone()
    labels[0, :9] = -100
    out = ours(ids, labels=labels, return_logits=False)
    ref = stock(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        want = grads[name].grad
        assert (p.grad - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0), name
    # pre-shifted targets (what training.pretrain passes) give the same loss as labels shifted inside
    shifted = ours(ids[:, :-1], shift_labels=ids[:, 1:], return_logits=False).loss
    full = F.cross_entropy(ours(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(shifted, full, rtol=1e-6, atol=1e-6)


def test_errors():
    ours, _ = twin_models(seed=22)
    ids = torch.randint(3, 512, (2, 10))
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, labels=ids, return_logits=False, logits_to_keep=1)
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="do not match"):
        lce.linear_cross_entropy(h, w, t[:-1])
    loss = lce.linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):  # the stored gradients were consumed (scaled in place) by the first one
        loss.backward()
