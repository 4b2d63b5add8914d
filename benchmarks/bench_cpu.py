"""CPU benchmarks, ours vs stock transformers side by side in one process (these machines are noisy: compare
ratios, not absolute numbers). Writes benchmarks/results/cpu.{json,md}.

    python benchmarks/bench_cpu.py                 # everything (~10 minutes on 2 cores)
    python benchmarks/bench_cpu.py --only decode   # train | decode | tokenizer

- train: forward + backward + AdamW step, tokens/s, ``100M`` preset (105M parameters), seq 512, fp32 and bf16
  autocast, same weights in both models. On AMD CPUs also the fp32 step per kind of process: a plain one (MKL's
  default kernels) and one that imports ``training`` first (MKL's Intel kernels, ``training.mkl_amd``), each
  running both models, steps alternating between the two child processes.
- decode: greedy generation tokens/s at batch 1 and 8 and prefill latency, ours vs stock with the dynamic cache;
  our fastest path (static cache, ``torch.compile``d decode step; bf16 weights where the CPU computes bf16
  natively, else fp32): its whole ``generate`` (prefill + steps), its prefill alone and its steady step; each
  against the memory-bandwidth bound (weight bytes per step / measured copy bandwidth); the fast path with
  ``dtype=bfloat16`` where bf16 is not the CPU's default (half the weight bytes); and the fast path at batch 8 with
  a long cache (``--long_max_length``, default 2048).
- tokenizer: encode MB/s of ours (fast, slow) vs sentencepiece on the ~5 MB Shakespeare corpus, with mismatches.
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import json
import lzma
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if os.environ.get("BENCH_CHILD_MKL_AMD") == "1":  # a child of bench_train_processes, started as training/ starts:
    import training  # noqa: E402, F401  (turns on MKL's Intel kernels on AMD CPUs, before torch loads)

import torch  # noqa: E402


def _twins(preset: str, seed: int = 0, device: str | torch.device = "cpu", **overrides):
    """Ours and stock ``transformers.LlamaForCausalLM`` of ``preset`` (+ config ``overrides``), same weights."""
    import transformers

    from modeling_llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig.from_preset(preset, **overrides)
    with torch.device(device):
        ours = LlamaForCausalLM(cfg)
        stock = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_dict()))
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _timeit(fn, repeats: int, warmup: int = 1, device: torch.device | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; on a CUDA ``device`` each
    timed call is bracketed by synchronisations, so that it measures the device's work, not the launches."""

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _train_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))


def _compiled_as_pretrain(ours):
    """A copy of ``ours`` as ``training.pretrain --compile true`` runs it on CPU: regional compilation and
    ``attn_implementation="blocked_causal"`` (pretrain's ``auto`` on CPU)."""
    from training.parallel import apply_compile
    from training.pretrain import resolve_attn_implementation

    model = apply_compile(copy.deepcopy(ours))
    model.set_attn_implementation(resolve_attn_implementation("auto", cuda=False))
    return model


def _train_step(model, ids: torch.Tensor, dtype: str, fused: bool, compiled_loss: bool):
    """One training step as a closure returning the loss: forward (under bf16 autocast for ``dtype == "bf16"``),
    next-token CE in fp32 (``fused``: the LM head and loss in one pass, pretrain's CPU default; else logits and a
    separate loss, ``torch.compile``d if ``compiled_loss``), backward, fused AdamW step."""
    from training.pretrain import _loss, cross_entropy

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ce = None if fused else torch.compile(cross_entropy) if compiled_loss else cross_entropy

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if ce is None:
                loss = _loss(model, ids, None)  # loss_fn None: fused with the LM head
            else:
                logits = model(input_ids=ids[:, :-1]).logits
        if ce is not None:
            loss = ce(logits, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ------------------------------------------------------------------------------------------------ training step
def bench_train(
    preset: str, seq: int, batch: int, repeats: int, compile: bool = True, dtypes: tuple[str, ...] = ("fp32", "bf16")
) -> list[dict]:
    """Stock and ours in eager mode (both SDPA), and ours with regional compilation
    (``training.parallel.apply_compile``) and a compiled loss, as ``training.pretrain --compile true`` runs it on
    CPU: ``attn_implementation="blocked_causal"`` (pretrain's ``auto`` on CPU) and the loss fused with the LM
    head (``fused_loss``, on by default on CPU); and, to show what those two choices are worth, compiled with SDPA
    and a compiled separate loss. Same weights, loss (next-token CE in fp32) and optimizer (fused AdamW: what
    ``training.optim`` picks and transformers' ``Trainer`` defaults to).

    Also measured, from one profiled stock step: the share of the step spent in the matrix products and attention
    kernels (``aten::mm``/``addmm``/``bmm``, SDPA forward and backward), which no fusion of the rest can remove;
    ``1 / share`` is the most any implementation running the same kernels can gain over stock."""
    from training.parallel import apply_compile

    rows = []
    ours, stock = _twins(preset)
    models = {"stock": stock, "ours": ours}
    if compile:
        models["ours_compiled"] = _compiled_as_pretrain(ours)
        models["ours_compiled_sdpa"] = apply_compile(copy.deepcopy(ours))
    ids = _train_ids(ours.config.vocab_size, batch, seq)
    for dtype in dtypes:
        # the fused loss for "ours_compiled" (what pretrain runs), else logits + a separate loss (compiled for ours)
        steps = {
            name: _train_step(model, ids, dtype, fused=name == "ours_compiled", compiled_loss=name.startswith("ours_"))
            for name, model in models.items()
        }
        times = {name: [] for name in models}
        for name in models:
            steps[name]()  # warm-up (and compilation)
            steps[name]()
        for _ in range(repeats):  # interleaved, so that drifting machine load hits all alike
            for name in models:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        tok = batch * seq
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "bench": "train step",
            "dtype": dtype,
            "tokens_per_step": tok,
            "stock_tokens_per_s": tok / med["stock"],
            "ours_tokens_per_s": tok / med["ours"],
            "ratio": med["stock"] / med["ours"],
            "times": times,
        }
        if compile:
            row["ours_compiled_tokens_per_s"] = tok / med["ours_compiled"]
            row["compiled_ratio"] = med["stock"] / med["ours_compiled"]
            row["compiled_attn_implementation"] = models["ours_compiled"].config._attn_implementation
            row["ours_compiled_sdpa_tokens_per_s"] = tok / med["ours_compiled_sdpa"]
            row["compiled_sdpa_ratio"] = med["stock"] / med["ours_compiled_sdpa"]
        row["stock_matmul_attention_share"] = _kernel_share(steps["stock"])
        row["max_ratio_same_kernels"] = 1 / row["stock_matmul_attention_share"]
        rows.append(row)
        gc.collect()
    return rows


def bench_train_processes(preset: str, seq: int, batch: int, repeats: int) -> dict:
    """The fp32 training step as each kind of process runs it, on an AMD CPU: stock transformers in a plain process
    (MKL's non-Intel kernels) against ours as ``training.pretrain`` runs it (``import training`` first turns on
    MKL's Intel kernels, see ``training.mkl_amd``; compiled, blocked causal attention, fused loss). Both models
    run in both kinds of process, so the table also shows what the MKL switch gives each, and the ratio at equal
    kernels. Two child processes hold the models; their steps alternate (default/stock, switched/stock,
    default/ours, switched/ours), so drifting machine load hits all four alike."""
    import subprocess

    from training import mkl_amd

    if mkl_amd.cpu_vendor() != "AuthenticAMD":
        return {"skipped": f"not an AMD CPU ({mkl_amd.cpu_vendor() or 'unknown vendor'}): MKL's switch does nothing"}
    children = {}
    for kind, switch in (("default", "0"), ("mkl_amd", "1")):
        env = {**os.environ, mkl_amd.ENV_VAR: switch, "BENCH_CHILD_MKL_AMD": switch}
        cmd = [sys.executable, __file__, "--train_child", "--preset", preset, "--train_batch", str(batch)]
        cmd += ["--seq", str(seq)]
        children[kind] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(kind: str, message: str) -> dict:
        child = children[kind]
        if message:
            child.stdin.write(message + "\n")
            child.stdin.flush()
        for line in child.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"training-step child ({kind}) exited with {child.wait()}")

    try:
        ready = {kind: ask(kind, "") for kind in children}
        series = {(k, m): [] for k in children for m in ("stock", "ours_compiled")}
        losses = {}
        for _ in range(repeats):
            for model in ("stock", "ours_compiled"):
                for kind in children:
                    reply = ask(kind, model)
                    series[kind, model].append(reply["seconds"])
                    losses.setdefault((kind, model), reply["loss"])
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    tok = batch * seq
    tps = {f"{model}_{kind}_tokens_per_s": tok / statistics.median(v) for (kind, model), v in series.items()}
    return {
        "bench": "train step, per process",
        "dtype": "fp32",
        "tokens_per_step": tok,
        **tps,
        "ours_switched_vs_stock_default": tps["ours_compiled_mkl_amd_tokens_per_s"] / tps["stock_default_tokens_per_s"],
        "ratio_default": tps["ours_compiled_default_tokens_per_s"] / tps["stock_default_tokens_per_s"],
        "ratio_mkl_amd": tps["ours_compiled_mkl_amd_tokens_per_s"] / tps["stock_mkl_amd_tokens_per_s"],
        "mkl_amd_active": {kind: r["mkl_amd_active"] for kind, r in ready.items()},
        "first_loss": {f"{model}_{kind}": v for (kind, model), v in losses.items()},
        "times": {f"{model}_{kind}": v for (kind, model), v in series.items()},
    }


def _train_child(preset: str, seq: int, batch: int) -> None:
    """Child of :func:`bench_train_processes`: builds stock and ours (compiled, as pretrain runs it), warms both
    up, then runs one fp32 step per model name read from stdin, answering ``@@ {json}`` lines."""
    from training import mkl_amd

    ours, stock = _twins(preset)
    ids = _train_ids(ours.config.vocab_size, batch, seq)
    steps = {
        "stock": _train_step(stock, ids, "fp32", fused=False, compiled_loss=False),
        "ours_compiled": _train_step(_compiled_as_pretrain(ours), ids, "fp32", fused=True, compiled_loss=True),
    }
    del ours
    for step in steps.values():
        step(), step()  # warm-up (and compilation)
    print("@@ " + json.dumps({"mkl_amd_active": mkl_amd.active(), "mkl_amd_state": mkl_amd.state()}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        loss = steps[line.strip()]()
        print("@@ " + json.dumps({"seconds": time.perf_counter() - t0, "loss": loss}), flush=True)


_DENSE_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def _kernel_share(step) -> float:
    """Fraction of one profiled call of ``step`` spent (self CPU time, wall-clock: ops run one at a time, each
    threaded) in matrix products and the attention kernels, forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    dense = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(_DENSE_KERNELS))
    return dense / 1e6 / wall


# ------------------------------------------------------------------------------------------------ decoding
def linear_rate(weight_bytes: int, dtype: torch.dtype, rows: int = 1, kernel: bool = False, repeats: int = 5) -> float:
    """Bytes/s at which one product of ``rows`` rows by a weight matrix of ``weight_bytes`` in ``dtype`` (out of
    cache) streams the weight: ``F.linear`` (the kernel stock and eager decoding run), or with ``kernel`` our
    :func:`modeling_llama.cpu_linear.small_batch_linear` (what the fast path calls at batch 2-16, and at batch 1 in
    bf16 where the kernel has the bf16 dot-product form)."""
    from modeling_llama import cpu_linear

    cols = 4096
    w = torch.randn(max(1, weight_bytes // (dtype.itemsize * cols)), cols).to(dtype)
    x = torch.randn(rows, cols).to(dtype)
    fn = cpu_linear.small_batch_linear if kernel else torch.nn.functional.linear
    best = min(_timeit(lambda: fn(x, w), repeats))
    return w.numel() * dtype.itemsize / best


def copy_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5, huge: bool = False) -> float:
    """Bytes/s of a large tensor copy (read + write counted once each, like STREAM copy: 2 x size); with ``huge``,
    of tensors on transparent huge pages (``modeling_llama.huge_pages``: where ``FastDecoder`` puts the weights on
    CPU), NaN where the system has none."""
    if huge:
        from modeling_llama import huge_pages

        if not huge_pages.available():
            return float("nan")
        src = huge_pages.empty(n_bytes).view(torch.float32).uniform_()
        dst = huge_pages.empty(n_bytes).view(torch.float32)
    else:
        src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
    best = min(_timeit(lambda: dst.copy_(src), repeats))
    return 2 * n_bytes / best


def bench_decode(
    preset: str,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    compile: bool,
    long_max_length: int = 2048,
    bf16_rows: bool = True,
) -> list[dict]:
    rows = []
    ours, stock = _twins(preset)
    ours.eval()
    stock.eval()
    n_params = sum(p.numel() for p in ours.parameters())
    emb = ours.model.embed_tokens.weight.numel()
    for batch in (1, 8):
        prompt = torch.randint(3, ours.config.vocab_size, (batch, prompt_len))
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            ref = ours.generate(prompt, **kw)
            assert torch.equal(ref, stock.generate(prompt, **kw)), "ours and stock must agree"
        times = {"stock": [], "ours": []}
        prefill = {"stock": [], "ours": []}
        with torch.no_grad():
            for rep in range(repeats):
                pair = (("stock", stock), ("ours", ours))
                for name, m in pair if rep % 2 == 0 else pair[::-1]:  # alternate who runs first
                    t0 = time.perf_counter()
                    m.generate(prompt, **kw)
                    times[name].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    m(prompt)
                    prefill[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "bench": "greedy decode",
            "batch": batch,
            "prompt": prompt_len,
            "new_tokens": new_tokens,
            "stock_tokens_per_s": batch * new_tokens / med["stock"],
            "ours_tokens_per_s": batch * new_tokens / med["ours"],
            "ratio": med["stock"] / med["ours"],
            "stock_prefill_ms": 1e3 * statistics.median(prefill["stock"]),
            "ours_prefill_ms": 1e3 * statistics.median(prefill["ours"]),
        }
        # the fastest path: static cache + compiled step (bf16 weights where native, else fp32)
        from modeling_llama import FastDecoder, cpu_linear

        streamed = n_params - emb  # parameters each step reads (the embedding table is gathered, not streamed)
        dec = FastDecoder(copy.deepcopy(ours), batch, prompt_len + new_tokens + 1, compile=compile)
        row.update(_time_fast(dec, prompt, new_tokens, repeats, streamed, reference=ref[:, prompt_len:]))
        row["fast_vs_stock"] = row["fast_tokens_per_s"] / row["stock_tokens_per_s"]
        # what the step streams, against a bare F.linear at batch 1 over the same bytes in the same dtype (the
        # kernel eager decoding runs; the fast path's compiled GEMV replaces it at batch 1)
        weight_bytes = streamed * dec.dtype.itemsize
        row["linear_gemv_GBps"] = linear_rate(weight_bytes, dec.dtype) / 1e9  # one row
        row["linear_rows_GBps"] = linear_rate(weight_bytes, dec.dtype, batch) / 1e9  # the step's rows
        if dec.dtype in (torch.float32, torch.bfloat16) and cpu_linear.available(dec.dtype):
            row["cpu_linear_rows_GBps"] = linear_rate(weight_bytes, dec.dtype, batch, kernel=True) / 1e9
        del dec
        gc.collect()
        if compile:
            # the same fast path with its steps' wrapper compiled to C++ (FastDecoder(cpp_wrapper=True), an opt-in:
            # each step's first compile takes ~35% longer)
            dec = FastDecoder(copy.deepcopy(ours), batch, prompt_len + new_tokens + 1, cpp_wrapper=True)
            cpp = _time_fast(dec, prompt, new_tokens, repeats, streamed, reference=ref[:, prompt_len:])
            row.update({"fast_cpp_" + k.removeprefix("fast_"): v for k, v in cpp.items()})
            row["fast_cpp_vs_stock"] = cpp["fast_tokens_per_s"] / row["stock_tokens_per_s"]
            del dec
            gc.collect()
        if bf16_rows and row["fast_dtype"] != "bfloat16":
            # the fast path with dtype=bfloat16 where the CPU has no bf16 arithmetic (half the weight memory): the
            # bf16 products in cpu_linear's kernel at batch 2-16, inductor's upcasting loop at batch 1
            dec = FastDecoder(
                copy.deepcopy(ours), batch, prompt_len + new_tokens + 1, dtype=torch.bfloat16, compile=compile
            )
            bf16 = _time_fast(dec, prompt, new_tokens, repeats, streamed, reference=ref[:, prompt_len:])
            row.update({"fast_bf16_" + k.removeprefix("fast_"): v for k, v in bf16.items()})
            row["fast_bf16_vs_stock"] = bf16["fast_tokens_per_s"] / row["stock_tokens_per_s"]
            del dec
            gc.collect()
        rows.append(row)
    if long_max_length:
        # the same generation with the cache sized for a long conversation: the step attends over a prefix of the
        # static cache (buckets of 64, 128, ... positions), so it costs what a tight max_length costs
        batch = 8
        tight = next(r for r in rows if r["batch"] == batch)
        torch.manual_seed(1)
        prompt = torch.randint(3, ours.config.vocab_size, (batch, prompt_len))
        dec = FastDecoder(copy.deepcopy(ours), batch, long_max_length, compile=compile)
        row = {"bench": "greedy decode", "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens}
        row["max_length"] = long_max_length
        row["buckets"] = list(dec.buckets)
        row.update(_time_fast(dec, prompt, new_tokens, repeats, n_params - emb))
        row["stock_tokens_per_s"] = tight["stock_tokens_per_s"]  # the dynamic cache has no max_length
        row["fast_vs_stock"] = row["fast_tokens_per_s"] / tight["stock_tokens_per_s"]
        row["fast_vs_tight_max_length"] = row["fast_tokens_per_s"] / tight["fast_tokens_per_s"]
        rows.append(row)
        del dec
        gc.collect()
    return rows


def _time_fast(dec, prompt: torch.Tensor, new_tokens: int, repeats: int, streamed_params: int, reference=None) -> dict:
    """Tokens/s of ``dec.generate`` (prefill + steps), its prefill alone (``generate`` of one token) and its steady
    step, each against the bandwidth bound measured just before it (``streamed_params`` read once a step, in the
    decoder's dtype); with ``reference`` (the fp32 greedy tokens, (B, new_tokens)), also how its tokens compare."""
    batch = prompt.shape[0]
    t0 = time.perf_counter()
    dec.generate(prompt, new_tokens)  # compiles
    row = {"fast_compile_s": time.perf_counter() - t0}
    dec.generate(prompt, new_tokens)  # warm-up
    # Each timed run is paired with a copy-bandwidth measurement taken just before it: the machine's bandwidth
    # moves with its neighbours' load (33-55 GB/s within one day here), so the fraction of the bound is taken
    # per pair, at the same moment, and the median pair reported.
    gen, pre, bws, bws_huge = [], [], [], []
    for _ in range(max(repeats, 5)):
        bws.append(copy_bandwidth(repeats=3))
        bws_huge.append(copy_bandwidth(repeats=3, huge=True))  # the pages the weights are on (CPU: huge pages)
        t0 = time.perf_counter()
        dec.generate(prompt, new_tokens)
        gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dec.generate(prompt, 1)  # the prefill alone (its token is the prefill's argmax)
        pre.append(time.perf_counter() - t0)
    steps = [(g - p) / (new_tokens - 1) for g, p in zip(gen, pre)]  # seconds per step after the prefill
    bw = statistics.median(bws)
    weight_bytes = streamed_params * dec.dtype.itemsize
    row["fast_dtype"] = str(dec.dtype).removeprefix("torch.")
    row["fast_tokens_per_s"] = batch * new_tokens / statistics.median(gen)
    row["fast_prefill_ms"] = 1e3 * statistics.median(pre)
    row["fast_step_ms"] = 1e3 * statistics.median(steps)
    row["fast_step_tokens_per_s"] = batch / statistics.median(steps)
    row["copy_bandwidth_GBps"] = bw / 1e9
    row["copy_bandwidth_GBps_runs"] = [b / 1e9 for b in bws]
    # bandwidth bound: every decoded step reads all weights once (in the fast path's dtype: bf16 where the CPU
    # computes it natively, else fp32); the KV cache and the prefill (compute-bound) are not in it
    row["bound_tokens_per_s"] = batch * bw / weight_bytes
    row["fast_weight_GBps"] = row["fast_tokens_per_s"] / batch * weight_bytes / 1e9
    row["fast_step_weight_GBps"] = row["fast_step_tokens_per_s"] / batch * weight_bytes / 1e9

    def per_pair(bandwidths: list[float]) -> tuple[list[float], list[float]]:
        """(tok/s) / (bw / bytes), per pair: the whole generate (prefill included) and the steps alone."""
        whole = [weight_bytes / g * new_tokens / b for g, b in zip(gen, bandwidths)]
        return whole, [weight_bytes / t / b for t, b in zip(steps, bandwidths)]

    fractions, step_fractions = per_pair(bws)
    row["fast_fraction_of_bound"] = statistics.median(fractions)
    row["fast_fraction_of_bound_runs"] = fractions
    row["fast_step_fraction_of_bound"] = statistics.median(step_fractions)
    row["fast_step_fraction_of_bound_runs"] = step_fractions
    # the same against a copy between tensors on huge pages, where the decoder's weights are (a tighter bound: a
    # copy on 4 KB pages pays a TLB miss every 4 KB)
    row["fast_huge_page_bytes"] = getattr(dec, "huge_page_bytes", 0)
    if row["fast_huge_page_bytes"]:  # huge pages the kernel put in their mapping (best effort; whole 2-MB pages)
        from modeling_llama import huge_pages

        first = next(m for m in dec.model.modules() if isinstance(m, torch.nn.Linear))
        # (the weight the steps read: the decoder's packed copy where it made one)
        row["fast_huge_page_backed_bytes"] = huge_pages.huge_page_bytes(getattr(first, "_fast_packed", first.weight))
    row["copy_bandwidth_huge_GBps"] = statistics.median(bws_huge) / 1e9
    row["copy_bandwidth_huge_GBps_runs"] = [b / 1e9 for b in bws_huge]
    fractions_huge, step_fractions_huge = per_pair(bws_huge)
    row["fast_fraction_of_bound_huge"] = statistics.median(fractions_huge)
    row["fast_step_fraction_of_bound_huge"] = statistics.median(step_fractions_huge)
    if reference is not None:
        with torch.no_grad():
            out = dec.generate(prompt, new_tokens)
            # each token the fast path chose is the argmax of the eager model's logits in its dtype (teacher-forced
            # on the fast path's own tokens), up to rounding between kernels
            ids = torch.cat([prompt, out], 1)
            logits = dec.model(ids).logits[:, prompt.shape[1] - 1 : -1].float()
        gap = logits.max(-1).values - logits.gather(-1, out[..., None])[..., 0]
        row["fast_max_logit_gap_vs_eager"] = gap.max().item()
        row["fast_agreement_with_fp32_greedy"] = (out == reference).float().mean().item()
    return row


# ------------------------------------------------------------------------------------------------ tokenizer
def bench_tokenizer(repeats: int) -> list[dict]:
    """Encode MB/s of sentencepiece and ours on all threads (here) and on one thread (a child process: the Rust
    thread pool is sized once per process, from ``RAYON_NUM_THREADS``), repetitions interleaved, medians."""
    import subprocess

    rows = _tokenizer_rows(repeats, os.cpu_count() or 1)
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--tokenizer_child", "--repeats", str(repeats)]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows += json.loads(child.stdout.strip().splitlines()[-1])
    return sorted(rows, key=lambda r: (r["threads"], r["tokenizer"]))


def _tokenizer_rows(repeats: int, threads: int) -> list[dict]:
    import sentencepiece as spm

    from modeling_llama import LlamaTokenizer, LlamaTokenizerFast
    from modeling_llama.tokenization_llama_fast import encode_batch_ids

    with lzma.open(REPO / "training/data/shakespeare.jsonl.xz", "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    model = str(REPO / "tests/fixtures/tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    fast = LlamaTokenizerFast(vocab_file=model)
    reference = sp.encode(docs, num_threads=1)
    backend = fast.backend_tokenizer
    runs = {
        "sentencepiece": lambda: sp.encode(docs, num_threads=threads),
        "ours fast (`encode_batch_ids`, what `training/` uses)": lambda: encode_batch_ids(backend, docs),
        "ours fast (`encode_batch_fast`)": lambda: [
            e.ids for e in fast.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
        ],
        "ours fast (`tokenizer(docs)`)": lambda: [ids[1:] for ids in fast(docs)["input_ids"]],
    }
    if threads > 1:  # the slow tokenizer is sentencepiece inside transformers, one document at a time
        slow = LlamaTokenizer(vocab_file=model)
        runs["ours slow"] = lambda: [ids[1:] for ids in slow(docs)["input_ids"]]
    mismatches = {name: sum(a != b for a, b in zip(fn(), reference)) for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so that drifting machine load hits all alike
        for name, fn in runs.items():
            times[name] += _timeit(fn, 1, warmup=0)
    return [
        {
            "bench": "tokenizer encode",
            "tokenizer": name,
            "threads": threads,
            "MB_per_s": mb / statistics.median(times[name]),
            "MB_per_s_runs": [mb / t for t in times[name]],
            "MB": mb,
            "documents": len(docs),
            "mismatched_documents": mismatches[name],
        }
        for name in runs
    ]


def _md_table(header: str, rows: list[dict], fmt) -> list[str]:
    """A markdown table's lines (header, separator, ``fmt(row)`` for each row, a blank line); none without rows."""
    if not rows:
        return []
    return [header, "|" + "---|" * (header.count("|") - 1), *map(fmt, rows), ""]


def _forms_text(forms: dict | None) -> str:
    if forms is None:
        return "?"
    if not forms:
        return "not built"
    bf16 = "bf16 dot products" if forms.get("bf16_dot") else "bf16 widened to fp32"
    return f"{bf16}, prefetch {forms.get('prefetch', '?')}"


def to_markdown(meta: dict, results: dict) -> str:
    lines = [
        f"CPU benchmarks ({meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
        f"transformers {meta['transformers']}; {meta.get('cpu_model', '?')} family/model "
        f"{meta.get('cpu_family_model', '?')}, {', '.join(meta.get('cpu_isa', []))}; torch kernels "
        f"{meta.get('cpu_capability', '?')}; cpu_linear {_forms_text(meta.get('cpu_linear_forms'))})",
        "",
    ]
    if results.get("train"):
        lines += [
            "| training step (100M, seq 512) | stock tok/s | ours tok/s | ours / stock | ours compiled tok/s | "
            "compiled / stock | compiled with SDPA, separate loss / stock | stock time in matmuls + attention "
            "| max ratio with the same kernels |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["train"]:
            lines.append(
                f"| {r['dtype']}, batch {r['tokens_per_step'] // 512} | {r['stock_tokens_per_s']:,.0f} | "
                f"{r['ours_tokens_per_s']:,.0f} | {r['ratio']:.2f}x | "
                f"{r.get('ours_compiled_tokens_per_s', float('nan')):,.0f} | "
                f"{r.get('compiled_ratio', float('nan')):.2f}x | {r.get('compiled_sdpa_ratio', float('nan')):.2f}x | "
                f"{r['stock_matmul_attention_share']:.0%} | "
                f"{r['max_ratio_same_kernels']:.2f}x |"
            )
        lines.append("")
    r = results.get("train_processes")
    if r and "skipped" not in r:
        lines += [
            "Training step per process (fp32, batch {b}): MKL's Intel kernels on this AMD CPU, as `import training` "
            "turns them on; stock transformers runs in a plain process.".format(b=r["tokens_per_step"] // 512),
            "",
            "| process | stock tok/s | ours compiled tok/s | ours / stock |",
            "|---|---|---|---|",
        ]
        for kind, label in (("default", "plain (MKL's non-Intel kernels)"), ("mkl_amd", "with the switch")):
            lines.append(
                f"| {label} | {r[f'stock_{kind}_tokens_per_s']:,.0f} | {r[f'ours_compiled_{kind}_tokens_per_s']:,.0f} "
                f"| {r['ratio_' + kind]:.2f}x |"
            )
        lines += [
            f"| **ours as pretrain runs it / stock in a plain process** | | | "
            f"**{r['ours_switched_vs_stock_default']:.2f}x** |",
            "",
        ]
    elif r:
        lines += [f"Training step per process: skipped, {r['skipped']}.", ""]
    if results.get("decode"):
        lines += [
            "| greedy decode (100M) | stock tok/s | ours tok/s | ours / stock | fastest tok/s | fastest / stock "
            "| fastest: dtype | bandwidth bound tok/s (its weights) | fastest / bound | fastest: prefill ms "
            "| fastest: step tok/s (after the prefill) | step / bound | fastest: weights GB/s, all / steps "
            "| F.linear GB/s, one row / the batch's rows | our kernel GB/s, the batch's rows "
            "| prefill ms stock / ours (eager) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for r in results["decode"]:
            if "max_length" in r:
                continue
            lines.append(
                f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']} | {r['stock_tokens_per_s']:.1f} | "
                f"{r['ours_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['fast_tokens_per_s']:.1f} | "
                f"{r['fast_vs_stock']:.2f}x | {r.get('fast_dtype', 'bfloat16')} | "
                f"{r.get('bound_tokens_per_s', r.get('bound_tokens_per_s_bf16', nan)):.1f} | "
                f"{r['fast_fraction_of_bound']:.0%} | {r.get('fast_prefill_ms', nan):.0f} | "
                f"{r.get('fast_step_tokens_per_s', nan):.1f} | {r.get('fast_step_fraction_of_bound', nan):.0%} | "
                f"{r['fast_weight_GBps']:.1f} / {r.get('fast_step_weight_GBps', nan):.1f} | "
                f"{r.get('linear_gemv_GBps', nan):.1f} / {r.get('linear_rows_GBps', nan):.1f} | "
                f"{r.get('cpu_linear_rows_GBps', nan):.1f} | "
                f"{r['stock_prefill_ms']:.0f} / {r['ours_prefill_ms']:.0f} |"
            )
        lines.append("")
        decode = results["decode"]
        lines += _md_table(
            "| greedy decode (100M), the bound from a copy on huge pages (where the fastest path's weights are) "
            "| weights on huge pages, MB | copy GB/s, 4 KB / huge pages | fastest / bound, 4 KB / huge-page copy "
            "| step / bound, 4 KB / huge-page copy |",
            [r for r in decode if "copy_bandwidth_huge_GBps" in r and "max_length" not in r],
            lambda r: (
                f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']} | "
                f"{r['fast_huge_page_bytes'] / 2**20:.0f} | "
                f"{r['copy_bandwidth_GBps']:.1f} / {r['copy_bandwidth_huge_GBps']:.1f} | "
                f"{r['fast_fraction_of_bound']:.0%} / {r['fast_fraction_of_bound_huge']:.0%} | "
                f"{r['fast_step_fraction_of_bound']:.0%} / {r['fast_step_fraction_of_bound_huge']:.0%} |"
            ),
        )
        lines += _md_table(
            "| greedy decode (100M), fastest path with `cpp_wrapper=True` (the step's wrapper in C++) | tok/s "
            "| / stock | / fastest (Python wrapper), one after the other | bound tok/s | / bound | step tok/s "
            "| step / bound | step / bound, per pair | tokens = fp32 greedy's |",
            [r for r in decode if "fast_cpp_tokens_per_s" in r],
            lambda r: (
                f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']} | {r['fast_cpp_tokens_per_s']:.1f} | "
                f"{r['fast_cpp_vs_stock']:.2f}x | {r['fast_cpp_tokens_per_s'] / r['fast_tokens_per_s']:.2f}x | "
                f"{r['fast_cpp_bound_tokens_per_s']:.1f} | {r['fast_cpp_fraction_of_bound']:.0%} | "
                f"{r['fast_cpp_step_tokens_per_s']:.1f} | {r['fast_cpp_step_fraction_of_bound']:.0%} | "
                f"{', '.join(f'{x:.0%}' for x in r['fast_cpp_step_fraction_of_bound_runs'])} | "
                f"{r['fast_cpp_agreement_with_fp32_greedy']:.0%} |"
            ),
        )
        lines += _md_table(
            "| greedy decode (100M), fastest path with `dtype=bfloat16` (bf16 emulated on this CPU) | tok/s "
            "| / stock (fp32, dynamic cache) | / fastest in its default dtype | bound tok/s (bf16 weights) "
            "| / bound | prefill ms | step tok/s | step / bound | tokens = fp32 greedy's | largest logit gap "
            "vs the eager bf16 model |",
            [r for r in decode if "fast_bf16_tokens_per_s" in r],
            lambda r: (
                f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']} | {r['fast_bf16_tokens_per_s']:.1f} | "
                f"{r['fast_bf16_vs_stock']:.2f}x | {r['fast_bf16_tokens_per_s'] / r['fast_tokens_per_s']:.2f}x | "
                f"{r['fast_bf16_bound_tokens_per_s']:.1f} | {r['fast_bf16_fraction_of_bound']:.0%} | "
                f"{r['fast_bf16_prefill_ms']:.0f} | {r['fast_bf16_step_tokens_per_s']:.1f} | "
                f"{r['fast_bf16_step_fraction_of_bound']:.0%} | "
                f"{r['fast_bf16_agreement_with_fp32_greedy']:.0%} | {r['fast_bf16_max_logit_gap_vs_eager']:.3f} |"
            ),
        )
        lines += _md_table(
            "| greedy decode (100M), a long max_length | cache buckets | fastest tok/s | fastest / stock "
            "| fastest / the same at a tight max_length | step tok/s | step / bound |",
            [r for r in decode if "max_length" in r],
            lambda r: (
                f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']}, max_length {r['max_length']} | "
                f"{', '.join(map(str, r['buckets']))} | {r['fast_tokens_per_s']:.1f} | {r['fast_vs_stock']:.2f}x | "
                f"{r['fast_vs_tight_max_length']:.2f}x | {r['fast_step_tokens_per_s']:.1f} | "
                f"{r['fast_step_fraction_of_bound']:.0%} |"
            ),
        )
    if results.get("tokenizer"):
        lines += ["| tokenizer encode (5 MB) | threads | MB/s (median) | mismatched documents |", "|---|---|---|---|"]
        for r in results["tokenizer"]:
            lines.append(
                f"| {r['tokenizer']} | {r.get('threads', '?')} | {r['MB_per_s']:.2f} | {r['mismatched_documents']} |"
            )
    return "\n".join(lines) + "\n"


def _cpu_info() -> dict:
    """The processor (results depend on it: these machines differ between sessions) and the kernels torch picks."""
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu_model"] = fields.get("model name", "?")
    info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    info["cpu_isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info["cpu_vendor"] = fields.get("vendor_id", "?")
    from modeling_llama import cpu_linear

    info["cpu_linear_forms"] = cpu_linear.forms()  # the kernel's bf16 form and prefetch hint on this CPU
    return info


def run_meta(**settings) -> dict:
    """The ``meta`` of a CPU benchmark's JSON: the processor, torch, the run's settings and the date."""
    return {"cpu": _cpu_info(), "torch": torch.__version__, **settings, "date": time.strftime("%Y-%m-%d")}


def write_results(out: str | Path, stem: str, result: dict, md: str) -> None:
    """``out/<stem>.json`` (``result``) and ``out/<stem>.md`` (the table), and the table on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)


def file_at(rev: str, path: str) -> str:
    """The text of the repository's file ``path`` at git revision ``rev``."""
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"cannot read {path} at {rev!r} with git: {e}") from None


def source_at(rev: str, path: str, name: str = "_SOURCE") -> str:
    """A kernel's source (the string ``name``, ``_SOURCE`` by default, of the module at ``path``, e.g.
    ``modeling_llama/cpu_linear.py``) at git revision ``rev``: what ``--against REV`` of the kernel benchmarks builds
    beside this tree's."""
    for node in ast.parse(file_at(rev, path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path} at {rev!r} has no {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["train", "decode", "tokenizer"], action="append")
    p.add_argument("--preset", default="100M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile (decode fast path, compiled step)")
    p.add_argument(
        "--long_max_length",
        type=int,
        default=2048,
        help="also time the fast path at batch 8 with a cache of this many positions (0: skip)",
    )
    p.add_argument(
        "--no_bf16_decode",
        action="store_true",
        help="skip the fast path with dtype=bfloat16 (timed where bf16 is not the CPU's default fast dtype)",
    )
    p.add_argument(
        "--dtypes", default="fp32,bf16", help="training-step dtypes, comma-separated (bf16 is slow without AVX512-BF16)"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tokenizer_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_child:
        _train_child(args.preset, args.seq, args.train_batch)
        return 0
    if args.tokenizer_child:  # one-thread tokenizer rows, printed as JSON for the parent (RAYON_NUM_THREADS=1)
        print(json.dumps(_tokenizer_rows(args.repeats, 1)))
        return 0
    import transformers

    todo = args.only or ["tokenizer", "decode", "train"]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        **_cpu_info(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cpu.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    if "tokenizer" in todo:
        results["tokenizer"] = bench_tokenizer(max(args.repeats, 5))
    if "decode" in todo:
        results["decode"] = bench_decode(
            args.preset,
            32,
            args.new_tokens,
            args.repeats,
            not args.no_compile,
            args.long_max_length,
            not args.no_bf16_decode,
        )
    if "train" in todo:
        dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
        if not dtypes or set(dtypes) - {"fp32", "bf16"}:
            p.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
        results["train"] = bench_train(args.preset, 512, args.train_batch, args.repeats, not args.no_compile, dtypes)
        if "fp32" in dtypes and not args.no_compile:
            results["train_processes"] = bench_train_processes(args.preset, 512, args.train_batch, args.repeats)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = to_markdown(meta, results)
    (out / "cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
