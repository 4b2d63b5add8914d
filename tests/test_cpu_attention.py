"""modeling_llama.cpu_attention: one-query attention on CPU, against the eager math in float64, inside models
(ours and stock transformers) and inside FastDecoder's compiled step. Its speed is in benchmarks/ (bench_cpu's
decode table; decode_op_overhead.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import REPO_ROOT, run_python_json, twin_models

from modeling_llama import FastDecoder, cpu_attention
from modeling_llama.modeling_llama import eager_attention_forward

has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c)
needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler built the kernel")


class _Module:  # what eager_attention_forward reads of the attention module
    training = False

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups


def reference(q, k, v, mask, scale):
    """The eager math in float64 (an additive mask; a boolean one as 0 / finfo.min, as transformers builds it)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    groups = q.shape[1] // k.shape[1]
    out, _ = eager_attention_forward(
        _Module(groups), q.double(), k.double(), v.double(), None if mask is None else mask.double(), scale
    )
    return out  # (B, 1, H, D)


@pytest.mark.skipif(not has_cxx, reason="no C++ compiler")
def test_kernel_builds_where_a_cxx_compiler_is():
    # a failed build must not pass unnoticed as the slower eager attention
    assert cpu_attention.available()
    path = cpu_attention.library_path()
    assert path is not None and path.is_file()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_eager_math(dtype):
    g = torch.Generator().manual_seed(0)
    low = torch.finfo(dtype).min
    # (B, H, Hk, S, D): heads shared by groups (GQA), D without a multiple of 8, one position, a long cache
    for b, h, hk, s, d in [(3, 4, 4, 50, 64), (2, 8, 2, 33, 12), (1, 2, 1, 1, 8), (4, 3, 3, 97, 128), (2, 2, 2, 7, 5)]:
        q = torch.randn(b, h, 1, d, generator=g).to(dtype)
        # a static cache's prefix: views with the cache's strides
        k = torch.randn(b, hk, s + 9, d, generator=g).to(dtype)[:, :, :s]
        v = torch.randn(b, hk, s + 9, d, generator=g).to(dtype)[:, :, :s]
        additive = torch.zeros(b, 1, 1, s + 4, dtype=dtype)  # longer than S, as a static cache's mask can be
        for i in range(b):
            additive[i, ..., max(1, s - 3 * i) :] = low  # each sequence at its own length
        additive[-1, ..., 0] = float("-inf") if s > 1 else 0.0  # -inf masks too (left padding)
        per_head = torch.randn(1, h, 1, s, generator=g).to(dtype)  # a mask per head, shared by the batch
        masks = [additive, additive > -1, None, per_head, additive[:1]]
        # scale 0.3: scores within a few units; 25: a sharp softmax, scores hundreds apart, most weights below
        # float's range (the kernel's exp flushes those to 0). There a score's float32 rounding (~1e-4 of a score
        # of ~1000) moves its weight by as much, relative: the tolerance grows to match.
        for mask, scale in [(m, 0.3) for m in masks] + [(additive, 25.0), (None, 25.0)]:
            out = cpu_attention.decode_attention(q, k, v, mask, scale)
            assert out.dtype == dtype and out.shape == (b, 1, h, d)
            ref = reference(q, k, v, mask, scale)
            sharp = scale > 1
            if dtype == torch.float32:
                torch.testing.assert_close(
                    out.double(), ref, rtol=2e-3 if sharp else 1e-5, atol=1e-4 if sharp else 1e-6
                )
            else:  # float32 sums, rounded to bf16 once
                rel = 2**-8 + (2e-3 if sharp else 0)
                assert ((out.double() - ref).abs() <= rel * ref.abs() + 1e-5).all(), (b, h, hk, s, d)


@needs_kernel
def test_masked_positions_are_not_read():
    """Positions the mask removes cost nothing and cannot leak in: NaN keys and values there change nothing."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (1, 40, 40))
    mask = torch.zeros(2, 1, 1, 40)
    mask[..., 25:] = torch.finfo(torch.float32).min
    clean = cpu_attention.decode_attention(q, k, v, mask, 0.25)
    k[:, :, 25:], v[:, :, 25:] = float("nan"), float("nan")
    assert torch.equal(cpu_attention.decode_attention(q, k, v, mask, 0.25), clean)
    # float32 sums against float64 ones: float32's tolerance (float64's default would ask for exact float32 sums)
    ref = reference(q, k[:, :, :25], v[:, :, :25], None, 0.25)
    torch.testing.assert_close(clean.double(), ref, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_every_position_masked_is_computed_as_eager_does():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (1, 6, 6))
    mask = torch.full((1, 1, 1, 6), torch.finfo(torch.float32).min)
    ref, _ = eager_attention_forward(_Module(1), q, k, v, mask, 0.5)
    torch.testing.assert_close(cpu_attention.decode_attention(q, k, v, mask, 0.5), ref)


@needs_kernel
def test_bad_inputs_say_what_is_wrong():
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 10, 8)
    with pytest.raises(RuntimeError, match="disagree in shape"):
        cpu_attention.decode_attention(q, k, torch.randn(2, 4, 9, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="one query row|q \\(B, H, 1, D\\)"):
        cpu_attention.decode_attention(torch.randn(2, 4, 3, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        cpu_attention.decode_attention(q.double(), k.double(), k.double(), None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be"):
        cpu_attention.decode_attention(q, k, k, torch.zeros(2, 1, 1, 5), 1.0)  # shorter than the keys


@needs_kernel
@pytest.mark.parametrize("which", ["ours", "stock"])
def test_attention_implementation_in_a_model(which):
    """``attn_implementation`` set to the kernel's name: the prefill runs eager, every one-token step the kernel;
    the greedy tokens are those of the stock model with eager attention (dynamic and static caches)."""
    ours, stock = twin_models(seed=21)
    model = ours if which == "ours" else stock
    model.config._attn_implementation = cpu_attention.ATTN_IMPLEMENTATION
    stock_eager = twin_models(seed=21)[1]
    stock_eager.config._attn_implementation = "eager"
    prompt = torch.randint(3, 512, (3, 9), generator=torch.Generator().manual_seed(21))
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = stock_eager.generate(prompt, **kwargs)
        with torch.profiler.profile() as prof:
            got = model.generate(prompt, **kwargs)
        static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(got, want) and torch.equal(static, want)
    calls = [e for e in prof.events() if e.name == "llama_hf::decode_attention"]
    assert len(calls) == 11 * model.config.num_hidden_layers  # every step after the prefill, every layer


@needs_kernel
def test_fast_decoder_step_calls_the_kernel():
    import copy

    ours, stock = twin_models(seed=22)
    reference_model = copy.deepcopy(stock)
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=2, max_length=40, dtype=torch.float32)
    assert dec.attn_implementation == cpu_attention.ATTN_IMPLEMENTATION
    prompt = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(22))
    dec.generate(prompt, 4)  # compiles
    with torch.profiler.profile() as prof:
        out = dec.generate(prompt, 6)
    with torch.no_grad():
        want = reference_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want[:, 7:])
    calls = [e for e in prof.events() if e.name == "llama_hf::decode_attention"]
    assert len(calls) == 5 * ours.config.num_hidden_layers  # the 5 steps after the prefill


def test_opt_out_keeps_eager_attention(tmp_path):
    code = """
import json, torch
from modeling_llama import FastDecoder, LlamaConfig, LlamaForCausalLM, cpu_attention
model = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
dec = FastDecoder(model, batch_size=2, max_length=16, compile=False)
try:
    cpu_attention.decode_attention(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), None, 1.)
    error = ""
except RuntimeError as e:
    error = str(e)
print(json.dumps({"available": cpu_attention.available(), "attn": dec.attn_implementation,
                  "error": cpu_attention.ENV_VAR in error}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CACHE_HOME": str(tmp_path), cpu_attention.ENV_VAR: "0"}
    env["LLAMA_CPU_LINEAR"] = "0"  # (not what this test is about: saves building the product kernel in a fresh cache)
    assert run_python_json(code, cwd=REPO_ROOT, env=env) == {"available": False, "attn": "eager", "error": True}
    assert not any(tmp_path.rglob("llama_hf_attention-*.so"))  # nothing was built
