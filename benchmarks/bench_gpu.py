"""GPU benchmarks: pretraining throughput and MFU of the ``1B`` preset at 2048 context, and decoding, side by side
with stock transformers in one process. Writes ``gpu.json`` and ``gpu.md`` (default: benchmarks/results/).

    python benchmarks/bench_gpu.py                       # env + train + decode + profile (~8 minutes on an H100)
    python benchmarks/bench_gpu.py --only train --variants ours:compile:selective ours:eager:none

- env: device, versions, a measured bf16 matmul rate (8192^3, random data) and device-to-device copy bandwidth.
- train: one optimizer step = ``--accum`` micro-batches of ``--batch`` x ``--seq`` tokens (forward + backward under
  bf16 autocast with fp32 master weights, as ``training.pretrain`` runs with ``bf16``) + gradient clipping at 1.0
  + fused AdamW with the paper's settings. Variants ``MODEL:EXEC:AC[:LOSS]``: MODEL ``ours`` or ``stock``
  (``transformers.LlamaForCausalLM`` with the same weights), EXEC ``eager`` or ``compile`` (regional compilation,
  ``training.parallel.apply_compile``), AC ``none``/``selective``/``full`` (``training.parallel``), LOSS ``plain``
  (fp32 logits, then cross-entropy, as ``training.pretrain``) or ``compiled`` (the cross-entropy compiled, so the
  fp32 upcast is fused away). MFU = tokens/s x (6N + 12 L d s) / peak (PaLM's convention, N without the input
  embedding; peak 989 TFLOP/s dense bf16 for an H100 SXM), also given against the measured matmul rate.
- decode: greedy tokens/s at batch 1 and 8 (prompt 128, 128 new tokens), bf16 weights: stock and ours with
  ``generate()`` and the dynamic cache, and our fastest path (``FastDecoder``: static cache + a step compiled with
  CUDA graphs); against the bound ``copy bandwidth / bytes of weights read per token``.
- profile: one step of the fastest training variant under torch.profiler, time per kernel class.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from bench_cpu import _timeit  # noqa: E402

DEFAULT_VARIANTS = [  # most informative first: a run cut short by a time limit still has these
    "ours:compile:none:compiled",
    "stock:eager:none",
    "ours:eager:none",
    "ours:compile:selective:compiled",
    "ours:compile:full:compiled",
    "ours:eager:selective",
    "ours:eager:full",
    "ours:compile:none",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _overrides(args) -> dict:
    """LlamaConfig overrides of the preset from the command line."""
    return {"num_hidden_layers": args.layers} if args.layers else {}


# ------------------------------------------------------------------------------------------------ env
def bench_env(device: torch.device) -> dict:
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sms"] = props.multi_processor_count
        env["memory_GiB"] = props.total_memory / 2**30
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = _timeit(partial(torch.matmul, a, b), 10, warmup=3, device=device)
    env["matmul_bf16_TFLOPs"] = 2 * n**3 / statistics.median(times) / 1e12
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(size // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    times = _timeit(partial(dst.copy_, src), 10, warmup=3, device=device)
    env["copy_GBps"] = 2 * size / statistics.median(times) / 1e9  # bytes read + bytes written
    del a, b, src, dst
    _free(device)
    return env


# ------------------------------------------------------------------------------------------------ training
def _build(kind: str, cfg, state_dict, device):
    import transformers

    from modeling_llama import LlamaForCausalLM

    with torch.device(device):
        if kind == "ours":
            model = LlamaForCausalLM(cfg)
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_dict()))
    model.load_state_dict(state_dict)
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    return model


def bench_train_variant(variant: str, cfg, state_dict, device, args, fpt: float, peaks: dict) -> dict:
    from training.optim import build_optimizer
    from training.parallel import apply_activation_checkpointing, apply_compile
    from training.pretrain import cross_entropy

    parts = variant.split(":")
    kind, execution, ac = parts[:3]
    loss_kind = parts[3] if len(parts) > 3 else "plain"
    torch._dynamo.reset()
    _free(device)
    model = _build(kind, cfg, state_dict, device)
    model.train()
    apply_activation_checkpointing(model, ac)
    if execution == "compile":
        apply_compile(model)
    ce = torch.compile(cross_entropy) if loss_kind == "compiled" else cross_entropy
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        for _ in range(args.accum)
    ]
    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32

    def step() -> float:
        total = 0.0
        for batch in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (B, T, V)
            loss = ce(logits, batch[:, 1:]) / len(batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    t0 = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times = _timeit(lambda: losses.append(step()), args.steps, warmup=0, device=device)
    tokens = args.batch * args.seq * args.accum
    med = statistics.median(times)
    tps = tokens / med
    row = {
        "variant": variant,
        "model": kind,
        "execution": execution,
        "activation_checkpointing": ac,
        "loss": loss_kind,
        "tokens_per_step": tokens,
        "step_s": med,
        "step_s_all": times,
        "tokens_per_s": tps,
        "model_TFLOPs": tps * fpt / 1e12,
        "peak_memory_GiB": _peak_mem(device),
        "warmup_s": warmup_s,
        "losses": [float(x) for x in losses],
    }
    if peaks.get("datasheet"):
        row["mfu"] = tps * fpt / peaks["datasheet"]
    if peaks.get("measured"):
        row["mfu_vs_measured_matmul"] = tps * fpt / peaks["measured"]
    if args.profile_variant == variant and device.type == "cuda":
        row["profile"] = profile_step(step, device, args.out)
    return row  # the model, optimizer and batches go with this frame


def _kernel_class(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "cudnn" in n and "sdpa" in n:
        return "attention (flash/sdpa)"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "cublas" in n or "xmma" in n:
        return "matmul (cuBLAS/CUTLASS)"
    if "adam" in n or "multi_tensor" in n or "foreach" in n or "l2norm" in n or "norm_kernel" in n:
        return "optimizer + clipping"
    if "triton" in n:
        return "fused element-wise (Triton)"
    if "cross_entropy" in n or "softmax" in n or "nll" in n:
        return "softmax / cross-entropy"
    if "elementwise" in n or "vectorized" in n or "reduce" in n or "copy" in n or "cat" in n or "index" in n:
        return "element-wise (eager)"
    return "other"


def profile_step(step, device, out: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    classes: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "self_cuda_time_total", 0)
        if dev_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        classes[_kernel_class(evt.key)] = classes.get(_kernel_class(evt.key), 0.0) + dev_us / 1e3
        kernels[evt.key] = kernels.get(evt.key, 0.0) + dev_us / 1e3
    total = sum(classes.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "gpu_profile.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    return {
        "device_ms_total": total,
        "classes_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": top,
    }


def bench_train(device, args, env) -> list[dict]:
    from modeling_llama import LlamaConfig, LlamaForCausalLM
    from training.metrics import flops_per_token, peak_flops_for_device

    cfg = LlamaConfig.from_preset(args.preset, **_overrides(args))
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    fpt = flops_per_token(
        n_params, base.model.embed_tokens.weight.numel(), cfg.num_hidden_layers, cfg.hidden_size, args.seq
    )
    state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
    del base
    peaks = {"datasheet": peak_flops_for_device(env["device"]), "measured": env.get("matmul_bf16_TFLOPs", 0) * 1e12}
    rows = []
    for variant in args.variants:
        print(f"[train] {variant} ...", flush=True)
        try:
            row = bench_train_variant(variant, cfg, state_dict, device, args, fpt, peaks)
        except Exception as exc:  # an OOM or a compile failure is a result too
            traceback.print_exc()
            row = {"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        row.update(
            preset=args.preset, n_params=n_params, flops_per_token=fpt, seq=args.seq, batch=args.batch, accum=args.accum
        )
        rows.append(row)
        print(_train_line(row), flush=True)
        _save_partial(args, "train", rows)
        _free(device)
    return rows


def _train_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']} | failed: {r['error'][:120]} |"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
    mfu_m = f"{r['mfu_vs_measured_matmul']:.1%}" if r.get("mfu_vs_measured_matmul") else "-"
    mem = f"{r['peak_memory_GiB']:.1f}" if r.get("peak_memory_GiB") is not None else "-"
    return (
        f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['model_TFLOPs']:.0f} | {mfu} | {mfu_m} | {mem} | "
        f"{r['warmup_s']:.0f} |"
    )


# ------------------------------------------------------------------------------------------------ decode
def bench_decode(device, args, env) -> list[dict]:
    from bench_cpu import _twins

    from modeling_llama import FastDecoder

    ours, stock = _twins(args.preset, device=device, **_overrides(args))
    ours, stock = ours.to(torch.bfloat16).eval(), stock.to(torch.bfloat16).eval()
    cfg = ours.config
    n_params = sum(p.numel() for p in ours.parameters())
    emb = ours.model.embed_tokens.weight.numel()
    weight_bytes = (n_params - emb) * 2  # bf16; the embedding table is gathered (B rows), not streamed
    bw = env["copy_GBps"] * 1e9
    bound = {batch: batch * bw / weight_bytes for batch in (1, 8)}  # tokens/s if weights streamed at copy speed
    rows = []
    new, plen = args.new_tokens, args.prompt
    for batch in (1, 8):
        print(f"[decode] batch {batch} ...", flush=True)
        gen = torch.Generator(device="cpu").manual_seed(batch)
        prompt = torch.randint(3, cfg.vocab_size, (batch, plen), generator=gen).to(device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        row = {"batch": batch, "prompt": plen, "new_tokens": new}
        try:
            with torch.no_grad():
                ours.generate(prompt, **kw)
                stock.generate(prompt, **kw)
                times = {"stock": [], "ours": []}
                for _ in range(args.decode_repeats):  # interleaved, so that drifting load hits both alike
                    for name, m in (("stock", stock), ("ours", ours)):
                        times[name] += _timeit(partial(m.generate, prompt, **kw), 1, warmup=0, device=device)
            med = {k: statistics.median(v) for k, v in times.items()}
            row.update(
                stock_tokens_per_s=batch * new / med["stock"],
                ours_tokens_per_s=batch * new / med["ours"],
                ours_vs_stock=med["stock"] / med["ours"],
            )
            for tuned in args.decode_tuning:
                key = "fast_tuned" if tuned else "fast"
                torch._dynamo.reset()
                import torch._inductor.config as inductor_config

                # gpt-fast's setting: let inductor search block sizes of its generated (GEMV) kernels
                inductor_config.coordinate_descent_tuning = tuned
                dec = FastDecoder(copy.deepcopy(ours), batch, plen + new + 8, compile=True)
                t0 = time.perf_counter()
                dec.generate(prompt, new)
                dec.generate(prompt, new)  # the CUDA graph is recorded on the second run
                _sync(device)
                row[f"{key}_compile_s"] = time.perf_counter() - t0
                outs: list[torch.Tensor] = []
                run = partial(lambda d, p, o: o.append(d.generate(p, new)), dec, prompt, outs)
                fast = _timeit(run, args.decode_repeats, warmup=0, device=device)
                out = outs[-1]  # the tokens of the last timed run, checked below
                inductor_config.coordinate_descent_tuning = False
                # correctness: each token the fast path picked is the argmax of the eager model's logits at that
                # position (teacher-forced on the fast path's own tokens), up to bf16 rounding between kernels
                with torch.no_grad():
                    logits = ours(torch.cat([prompt, out], 1)).logits[:, plen - 1 : plen - 1 + new].float()
                chosen = logits.gather(-1, out[..., None])[..., 0]
                gap = logits.max(-1).values - chosen  # (B, new) >= 0
                row[f"{key}_argmax_within_0.05"] = (gap <= 0.05).float().mean().item()
                row[f"{key}_max_logit_gap"] = gap.max().item()
                med_fast = statistics.median(fast)
                row[f"{key}_tokens_per_s"] = batch * new / med_fast
                row[f"{key}_vs_stock"] = med["stock"] / med_fast
                row[f"{key}_fraction_of_bound"] = row[f"{key}_tokens_per_s"] / bound[batch]
                del dec
            row["bound_tokens_per_s"] = bound[batch]
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}), flush=True)
        _save_partial(args, "decode", rows)
        _free(device)
    return rows


# ------------------------------------------------------------------------------------------------ report
_RESULTS: dict = {}


def _save_partial(args, key: str, rows) -> None:
    _RESULTS[key] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(_RESULTS, indent=2, default=str) + "\n")


def to_markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = [
        f"GPU benchmarks ({env.get('date')}, {env.get('device')}, torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, transformers {env.get('transformers')}); "
        f"measured bf16 matmul {env.get('matmul_bf16_TFLOPs', 0):.0f} TFLOP/s, "
        f"copy {env.get('copy_GBps', 0):.0f} GB/s",
        "",
    ]
    train = results.get("train") or []
    if train:
        r0 = train[0]
        lines += [
            f"Training, `{r0['preset']}` preset ({r0['n_params'] / 1e9:.2f}B parameters), seq {r0['seq']}, "
            f"micro-batch {r0['batch']} x accumulation {r0['accum']}, bf16 autocast, fused AdamW, clip 1.0:",
            "",
            "| variant (model:execution:checkpointing[:loss]) | tokens/s | model TFLOP/s | MFU (989) | MFU (measured "
            "matmul) | peak memory GiB | warm-up s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [_train_line(r) for r in train]
        lines.append("")
    decode = results.get("decode") or []
    if decode:
        lines += [
            "| greedy decode (bf16) | stock tok/s | ours tok/s | ours / stock | fastest path | tok/s | / stock | "
            "bound tok/s | / bound | tokens = eager argmax (±0.05) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in decode:
            if "error" in r:
                lines.append(f"| batch {r['batch']} | failed: {r['error'][:120]} |")
                continue
            for key, label in (("fast", "compiled + CUDA graphs"), ("fast_tuned", "+ coordinate-descent tuning")):
                if f"{key}_tokens_per_s" not in r:
                    continue
                lines.append(
                    f"| batch {r['batch']}, {r['prompt']}+{r['new_tokens']} | {r['stock_tokens_per_s']:,.0f} | "
                    f"{r['ours_tokens_per_s']:,.0f} | {r['ours_vs_stock']:.2f}x | {label} | "
                    f"{r[key + '_tokens_per_s']:,.0f} | {r[key + '_vs_stock']:.2f}x | {r['bound_tokens_per_s']:,.0f} | "
                    f"{r[key + '_fraction_of_bound']:.0%} | {r[key + '_argmax_within_0.05']:.0%} |"
                )
        lines.append("")
    for r in train:
        if "profile" in r:
            p = r["profile"]
            lines += [f"Profile of one step of `{r['variant']}` (device time by kernel class):", ""]
            lines += ["| kernels | ms | share |", "|---|---|---|"]
            for k, v in p["classes_ms"].items():
                lines.append(f"| {k} | {v:.1f} | {v / p['device_ms_total']:.0%} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["train", "decode"], action="append", help="default: train then decode")
    p.add_argument("--preset", default="1B")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (quick checks)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--profile_variant", default="ours:compile:none:compiled", help="variant to profile one step of")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--decode_repeats", type=int, default=3)
    p.add_argument(
        "--decode_tuning",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        nargs="+",
        default=[False],
        help="fast decode path without (false) / with (true) inductor coordinate-descent tuning",
    )
    p.add_argument("--cpu_bf16", action="store_true", help="on CPU (script checks only), use bf16 autocast")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    todo = args.only or ["train", "decode"]
    env = bench_env(device)
    print(json.dumps(env), flush=True)
    _save_partial(args, "env", env)
    if "train" in todo:
        bench_train(device, args, env)
    if "decode" in todo:
        bench_decode(device, args, env)
    md = to_markdown(_RESULTS)
    (Path(args.out) / "gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
