"""The fast decode path against stock transformers' greedy ``generate()`` (dynamic cache), compiled and not."""

from __future__ import annotations

import pytest
import torch
from conftest import op_calls, twin_models

from modeling_llama import FastDecoder, cpu_attention, cpu_linear

# the attention FastDecoder's CPU steps run: the one-row kernel where it builds, else eager
STEP_ATTN = cpu_attention.ATTN_IMPLEMENTATION if cpu_attention.available() else "eager"

PROMPT, NEW = 7, 12


@pytest.fixture(autouse=True)
def _drop_cached_kernel_choices():
    """Some tests here patch ``cpu_linear.available``; ``cpu_linear.eager_rows`` caches what it saw (an eager
    forward under the patch would leave later tests, in other files too, without the kernel): drop it after each."""
    yield
    cpu_linear.eager_rows.cache_clear()


def stock_greedy(stock, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        out = stock.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1] :]


def chosen_gap(stock, prompt: torch.Tensor, new_tokens: torch.Tensor) -> float:
    """Largest gap between the max logit and the chosen token's logit, teacher-forced through the stock model."""
    with torch.no_grad():
        logits = stock(torch.cat([prompt, new_tokens], 1)).logits[:, prompt.shape[1] - 1 : -1]
    chosen = logits.gather(-1, new_tokens[..., None])[..., 0]
    return (logits.max(-1).values - chosen).max().item()


# batch 1: the GEMV-as-reduction path; 3: cpu_linear's streaming kernel, or W @ x^T matmuls without it (fp32)
@pytest.mark.parametrize(("batch", "kernel"), [(1, False), (3, True), (3, False)])
def test_compiled_fast_decode_matches_stock_generate(batch, kernel, monkeypatch):
    import modeling_llama.fast_decode as fd

    if kernel and not fd.cpu_linear.available():
        pytest.skip("no C compiler built cpu_linear's kernel")
    if not kernel:
        monkeypatch.setattr(fd.cpu_linear, "available", lambda dtype=torch.float32: False)
    ours, stock = twin_models(seed=batch)
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=batch, max_length=PROMPT + NEW + 3, dtype=torch.float32)
    for seed in (0, 1):  # the second call runs with guard evaluation skipped: it must still be right
        prompt = torch.randint(3, 512, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
        out = dec.generate(prompt, NEW)
        assert out.shape == (batch, NEW)
        assert chosen_gap(stock, prompt, out) < 1e-4
        assert torch.equal(out, stock_greedy(stock, prompt, NEW))
    with torch.profiler.profile() as prof:  # which linear the compiled step runs
        dec.generate(prompt, 3)
    names = {e.key for e in prof.key_averages()}
    assert ("llama_hf::small_batch_linear" in names) == kernel
    assert not fd._PREFILL_WXT.get()  # the prefill's W @ x^T form ends with the prefill
    # the model's own eager forward is unchanged (the GEMV form is only traced while compiling)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_cpp_wrapper_step_matches_stock_generate():
    """``cpp_wrapper=True``: the compiled step's wrapper is C++ (inductor's ``cpp_wrapper``), and its tokens are
    still stock greedy's, also on the calls that skip guard evaluation. Off without compilation."""
    from torch._inductor.utils import run_and_get_code

    ours, stock = twin_models(seed=3)
    torch._dynamo.reset()
    assert not FastDecoder(ours, 3, PROMPT + NEW + 3, dtype=torch.float32, compile=False, cpp_wrapper=True).cpp_wrapper
    dec = FastDecoder(ours, batch_size=3, max_length=PROMPT + NEW + 3, dtype=torch.float32, cpp_wrapper=True)
    assert dec.cpp_wrapper
    prompts = [torch.randint(3, 512, (3, PROMPT), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    out, codes = run_and_get_code(dec.generate, prompts[0], NEW)  # compiles
    assert codes and all("CppWrapperCodeCache" in code for code in codes), [code[:200] for code in codes]
    assert torch.equal(out, stock_greedy(stock, prompts[0], NEW))
    assert torch.equal(dec.generate(prompts[1], NEW), stock_greedy(stock, prompts[1], NEW))


@pytest.mark.parametrize("compile", [True, False])
def test_steps_attend_over_cache_buckets(compile):
    """A long max_length: the step reads a 64-position view of the cache while the positions fit, then all of it;
    tokens stay stock's across the switch, and in a second call (guards skipped)."""
    ours, stock = twin_models(seed=9)
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=2, max_length=200, dtype=torch.float32, compile=compile)
    assert dec.buckets == (64, 200)
    for seed in (0, 1):
        prompt = torch.randint(3, 512, (2, 58), generator=torch.Generator().manual_seed(seed))
        out = dec.generate(prompt, 12)  # positions 58..68: bucket 64, then 200
        assert torch.equal(out, stock_greedy(stock, prompt, 12))
    small, full = dec._caches[64].layers[0], dec.cache.layers[0]
    assert small.keys.shape[2] == 64 and full.keys.shape[2] == 200
    assert small.keys.data_ptr() == full.keys.data_ptr()  # a view: written through, no second cache
    assert sorted(dec._steps) == [64, 200]
    if not compile:  # the LM head sees the last position only, in the prefill (58 positions here) as in the steps
        rows = []
        hook = ours.lm_head.register_forward_hook(lambda mod, args, out: rows.append(tuple(args[0].shape)))
        out = dec.generate(prompt, 3)
        hook.remove()
        assert rows == [(2, 1, ours.config.hidden_size)] * 3
        assert torch.equal(out, stock_greedy(stock, prompt, 3))


def test_eager_fast_decode_and_bf16():
    ours, stock = twin_models(seed=5)
    prompt = torch.randint(3, 512, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    dec = FastDecoder(ours, batch_size=2, max_length=PROMPT + NEW, dtype=torch.float32, compile=False)
    assert torch.equal(dec.generate(prompt, NEW), stock_greedy(stock, prompt, NEW))
    # bf16: each chosen token is the argmax of the bf16 model's own logits, up to rounding
    dec = FastDecoder(ours, batch_size=2, max_length=PROMPT + NEW, dtype=torch.bfloat16, compile=False)
    assert next(ours.parameters()).dtype == torch.bfloat16
    out = dec.generate(prompt, NEW)
    assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02


def test_emulated_bf16_across_cache_buckets(monkeypatch):
    """bf16 where the CPU has no bf16 arithmetic, prompt in the 64-position bucket, steps crossing into the full
    cache: the SDPA prefill writes the bucket's view, and each token is the bf16 model's argmax."""
    import modeling_llama.fast_decode as fd

    monkeypatch.setattr(fd, "native_bf16", lambda device: False)
    ours, stock = twin_models(seed=12)
    users_attn = ours.config._attn_implementation
    dec = FastDecoder(ours, batch_size=2, max_length=200, dtype=torch.bfloat16, compile=False)
    assert dec.buckets == (64, 200) and dec._prefill_attn == "sdpa"
    for seed in (0, 1):
        prompt = torch.randint(3, 512, (2, 58), generator=torch.Generator().manual_seed(seed))
        out = dec.generate(prompt, 12)  # positions 58..69: bucket 64, then 200
        assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02
    assert ours.config._attn_implementation == users_attn  # the step's attention was set for generate() only


def test_fast_decode_takes_a_stock_transformers_model():
    """FastDecoder over stock ``transformers.LlamaForCausalLM`` (its own cache argument and ``logits_to_keep``),
    across a cache-bucket switch: the tokens of the stock model's own ``generate()``."""
    import copy

    _, stock = twin_models(seed=11)
    reference = copy.deepcopy(stock)
    dec = FastDecoder(stock, batch_size=2, max_length=200, dtype=torch.float32, compile=False)
    assert dec.buckets == (64, 200) and dec._extra == {"logits_to_keep": 1}
    prompt = torch.randint(3, 512, (2, 58), generator=torch.Generator().manual_seed(11))
    assert torch.equal(dec.generate(prompt, 12), stock_greedy(reference, prompt, 12))


@pytest.mark.parametrize("native", [True, False])
def test_compiled_bf16_batch_picks_the_bf16_argmax(monkeypatch, native):
    """bf16 at batch 3: cpu_linear's bf16 kernel in the step wherever it builds (frozen oneDNN matmuls where it does
    not); where the CPU lacks bf16 arithmetic, fp32 products (upcast) with SDPA in the prefill. Each token is the
    bf16 model's argmax."""
    import modeling_llama.fast_decode as fd

    monkeypatch.setattr(fd, "native_bf16", lambda device: native)
    kernel = fd.cpu_linear.available(torch.bfloat16)
    ours, stock = twin_models(seed=8)
    users_attn = ours.config._attn_implementation
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=3, max_length=PROMPT + NEW, dtype=torch.bfloat16)
    assert dec._prefill_attn == (None if native else "sdpa") and dec._prefill_wxt is (kernel and not native)
    prompt = torch.randint(3, 512, (3, PROMPT), generator=torch.Generator().manual_seed(8))
    out = dec.generate(prompt, NEW)
    assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02
    assert ours.config._attn_implementation == users_attn  # the prefill's SDPA and the step's attention undone
    calls = op_calls(lambda: dec.generate(prompt, 3), "llama_hf::small_batch_linear")
    # the compiled steps call the kernel where it builds; with frozen weights only the eager prefill's LM head (3
    # rows of logits, our SmallBatchLinear's inference form) may
    assert (calls > 1) == kernel, calls


@pytest.mark.parametrize("dot", [True, False])
def test_bf16_batch_1_takes_the_kernel_where_it_has_bf16_dot_products(monkeypatch, dot):
    """bf16 at batch 1: cpu_linear's kernel where its bf16 form is the CPU's dot-product instruction (AVX512-BF16),
    else inductor's multiply-and-sum loop. Either way each token is the bf16 model's argmax. (Where this CPU has no
    such instruction, ``dot=True`` runs the kernel's widening form: the choice is what is tested then.)"""
    import modeling_llama.fast_decode as fd

    if not fd.cpu_linear.available(torch.bfloat16):
        pytest.skip("no C compiler built the kernel")
    monkeypatch.setattr(fd.cpu_linear, "forms", lambda: {"bf16_dot": dot, "prefetch": "nta"})
    ours, stock = twin_models(seed=9)
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=1, max_length=PROMPT + NEW, dtype=torch.bfloat16)
    prompt = torch.randint(3, 512, (1, PROMPT), generator=torch.Generator().manual_seed(9))
    out = dec.generate(prompt, NEW)
    assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02
    calls = op_calls(lambda: dec.generate(prompt, 3), "llama_hf::small_batch_linear")
    assert (calls > 1) == dot, calls  # (the eager prefill's one-row LM head is one call either way)


def test_bf16_without_the_kernel_freezes_the_weights(monkeypatch):
    """Where the kernel does not build, bf16 steps at batch 3 run frozen oneDNN matmuls over the whole cache."""
    import modeling_llama.fast_decode as fd

    monkeypatch.setattr(fd, "native_bf16", lambda device: True)
    monkeypatch.setattr(fd.cpu_linear, "available", lambda dtype=torch.float32: False)
    ours, stock = twin_models(seed=10)
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=3, max_length=PROMPT + NEW, dtype=torch.bfloat16)
    assert dec._compile_kwargs["options"]["freezing"] and dec.buckets == (PROMPT + NEW,)
    assert dec.huge_page_bytes == 0  # (inductor copies frozen weights: nothing to move)
    prompt = torch.randint(3, 512, (3, PROMPT), generator=torch.Generator().manual_seed(10))
    out = dec.generate(prompt, NEW)
    assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02


@pytest.mark.parametrize("native", [True, False])
def test_default_dtype_is_bf16_only_where_computed_natively(monkeypatch, native):
    """On a CPU without AVX512-BF16/AMX bf16 matmuls are emulated (slower than stock fp32 at batch 8): fp32 there."""
    import modeling_llama.fast_decode as fd

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert fd.native_bf16("cpu") is native
    assert fd.native_bf16("cuda")
    ours, _ = twin_models()
    dec = FastDecoder(ours, batch_size=1, max_length=16, compile=False)
    expected = torch.bfloat16 if native else torch.float32
    assert dec.dtype == expected and next(ours.parameters()).dtype == expected


def test_fast_decode_refuses_bad_input():
    ours, _ = twin_models()
    dec = FastDecoder(ours, batch_size=2, max_length=16, compile=False)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.generate(torch.zeros(3, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="larger max_length"):
        dec.generate(torch.zeros(2, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        dec.generate(torch.zeros(2, 10, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="at least one token per row"):
        dec.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        dec.generate(torch.zeros(2, 4), 3)
    assert dec.generate(torch.ones(2, 4, dtype=torch.int32), 2).shape == (2, 2)  # int32 ids are token ids too
    with pytest.raises(ValueError, match="batch_size >= 1"):
        FastDecoder(ours, batch_size=0, max_length=16)
    with pytest.raises(TypeError, match="causal LM"):
        FastDecoder(torch.nn.Linear(2, 2), batch_size=1, max_length=16)


def test_guard_skipping_falls_back_on_older_torch(monkeypatch):
    """torch 2.6 has ``set_stance`` without ``skip_guard_eval_unsafe``: the decoder then evaluates guards as usual
    instead of failing (the supported floor is torch>=2.6)."""
    import contextlib

    import modeling_llama.fast_decode as fd

    def old_set_stance(stance="default", *, force_backend=None):  # torch 2.6's signature
        raise AssertionError("must not be called with the new keyword")

    monkeypatch.setattr(torch.compiler, "set_stance", old_set_stance)
    assert isinstance(fd._skip_guards(True), contextlib.nullcontext)
    ours, stock = twin_models(seed=6)
    prompt = torch.randint(3, 512, (1, PROMPT), generator=torch.Generator().manual_seed(6))
    dec = FastDecoder(ours, batch_size=1, max_length=PROMPT + NEW, dtype=torch.float32, compile=False)
    assert torch.equal(dec.generate(prompt, NEW), stock_greedy(stock, prompt, NEW))


def test_the_model_outside_generate_is_the_users():
    """FastDecoder converts the model in place but leaves it computing as before outside ``generate()``: the user's
    attention implementation, the eager logits, and a model compiled elsewhere over more positions than the
    decoder's ``max_length`` (whose compiled steps look cos/sin up in a table of ``max_length`` positions)."""
    ours, stock = twin_models(seed=13)
    ours.config._attn_implementation = "sdpa"
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=2, max_length=PROMPT + NEW, dtype=torch.float32)
    assert dec.attn_implementation == STEP_ATTN
    prompt = torch.randint(3, 512, (2, PROMPT), generator=torch.Generator().manual_seed(13))
    assert torch.equal(dec.generate(prompt, NEW), stock_greedy(stock, prompt, NEW))
    assert ours.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 512, (2, 3 * (PROMPT + NEW)), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        expected = stock(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        traced = torch.compile(ours, backend="eager", fullgraph=True)  # dynamo traces the installed forwards
        torch.testing.assert_close(traced(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(dec.generate(prompt, NEW), stock_greedy(stock, prompt, NEW))  # and the decoder still works


def _bf16_dot_forms(monkeypatch, dot: bool = True):
    import modeling_llama.fast_decode as fd

    forms = {**fd.cpu_linear.forms(), "bf16_dot": dot}
    monkeypatch.setattr(fd.cpu_linear, "forms", lambda: forms)
    return fd


def test_packed_weights_steps_match_the_bf16_model_and_leave_the_model_alone():
    """``packed_weights=True``: the compiled steps read packed copies of every packable weight (here not the LM
    head: a vocabulary of 500 is no multiple of 32), each token is the bf16 model's argmax, and the model's own
    weights, state dict and eager forward are untouched."""
    import modeling_llama.fast_decode as fd

    if not fd.cpu_linear.forms().get("packed"):
        pytest.skip("no C compiler built cpu_linear's kernel")
    ours, stock = twin_models(seed=12, vocab_size=500)
    ours_ref = ours.to(torch.bfloat16).state_dict()
    ours_ref = {k: v.clone() for k, v in ours_ref.items()}
    torch._dynamo.reset()
    dec = FastDecoder(ours, batch_size=3, max_length=PROMPT + NEW, dtype=torch.bfloat16, packed_weights=True)
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    packed = [m for m in linears if hasattr(m, "_fast_packed")]
    assert packed == [m for m in linears if m is not ours.lm_head]
    assert dec.packed_bytes >= sum(m.weight.numel() * 2 for m in packed)
    for m in packed:
        assert torch.equal(fd.cpu_linear.unpack_weight(m._fast_packed), m.weight)
    # on huge pages where the system has them: the packed copies (which the steps read) and the unpacked LM head;
    # the packed modules' own weights stay where they were
    lm_head = ours.lm_head.weight.numel() * 2
    assert dec.huge_page_bytes == ((dec.packed_bytes + -(-lm_head // 64) * 64) if fd.thp.available() else 0)
    prompt = torch.randint(3, 500, (3, PROMPT), generator=torch.Generator().manual_seed(12))
    out = dec.generate(prompt, NEW)
    assert chosen_gap(stock.to(torch.bfloat16), prompt, out) <= 0.02
    steps = 2  # generate(prompt, 3): the prefill (eager), then two compiled steps
    n_layers = ours.config.num_hidden_layers
    # the prefill reads the packed copies too where the kernel has its dot-product form (AVX512-BF16)
    assert dec._prefill_packed == fd.cpu_linear.forms()["bf16_dot"]
    calls = (steps + dec._prefill_packed) * 7 * n_layers
    assert op_calls(lambda: dec.generate(prompt, 3), "llama_hf::packed_linear") == calls
    # the LM head (not packable) through the row kernel, once per step (the eager prefill's linears: F.linear)
    assert op_calls(lambda: dec.generate(prompt, 3), "llama_hf::small_batch_linear") == steps
    state = ours.state_dict()
    assert state.keys() == ours_ref.keys() and all(torch.equal(state[k], v) for k, v in ours_ref.items())
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():  # outside generate() the model's own products (F.linear), not the packed copies
        assert op_calls(lambda: ours(ids), "llama_hf::packed_linear") == 0
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=2e-2, atol=2e-2)


def test_packed_weights_default_rule(monkeypatch):
    """By default the weights are packed for compiled bf16 steps of PACKED_MIN_BATCH..MAX_ROWS rows on a CPU with
    bf16 dot products, where the copies fit in half the available memory; never in fp32, never with
    ``packed_weights=False``."""
    fd = _bf16_dot_forms(monkeypatch)
    if not fd.cpu_linear.forms().get("packed") or not fd.cpu_linear.available(torch.bfloat16):
        pytest.skip("no C compiler built cpu_linear's kernel")
    batch = fd.PACKED_MIN_BATCH

    def packed_bytes(**kwargs) -> int:
        ours, _ = twin_models(seed=13)
        kwargs = {"batch_size": batch, "max_length": 16, "dtype": torch.bfloat16, **kwargs}
        return FastDecoder(ours, **kwargs).packed_bytes

    weights = sum(m.weight.numel() * 2 for m in twin_models(seed=13)[0].modules() if isinstance(m, torch.nn.Linear))
    assert packed_bytes() >= weights
    tied, _ = twin_models(seed=13)  # a weight shared by two modules (as a tied LM head is): packed once, for both
    tied.model.layers[0].self_attn.k_proj.weight = tied.model.layers[0].self_attn.q_proj.weight
    dec = FastDecoder(tied, batch_size=batch, max_length=16, dtype=torch.bfloat16)
    attn = tied.model.layers[0].self_attn
    assert attn.k_proj._fast_packed is attn.q_proj._fast_packed
    assert dec.packed_bytes < weights
    assert packed_bytes(packed_weights=False) == 0
    assert packed_bytes(dtype=torch.float32) == 0
    assert packed_bytes(compile=False) == 0
    if batch > 1:
        assert packed_bytes(batch_size=batch - 1) == 0
    monkeypatch.setattr(fd, "_available_memory", lambda: 2 * weights - 2)  # the copies would not fit in half
    assert packed_bytes() == 0
    monkeypatch.setattr(fd, "_available_memory", lambda: None)  # unknown: not by default, on request yes
    assert packed_bytes() == 0 and packed_bytes(packed_weights=True) >= weights
    fd = _bf16_dot_forms(monkeypatch, dot=False)  # the widening form: not measured faster, so only on request
    monkeypatch.setattr(fd, "_available_memory", lambda: 1 << 40)
    assert packed_bytes() == 0 and packed_bytes(packed_weights=True) >= weights


def test_packed_weights_refused_where_they_cannot_apply():
    """A clear error, before the model is touched (not cast, no forwards installed)."""
    ours, _ = twin_models()
    with pytest.raises(ValueError, match="not torch.bfloat16"):
        FastDecoder(ours, batch_size=8, max_length=16, dtype=torch.float32, packed_weights=True)
    with pytest.raises(ValueError, match="compile=False"):
        FastDecoder(ours, batch_size=8, max_length=16, dtype=torch.bfloat16, compile=False, packed_weights=True)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert not any("forward" in vars(m) for m in ours.modules())
