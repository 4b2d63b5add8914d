"""Where the CPU training step's time goes: one profiled fp32 step of ours as ``training.pretrain`` runs it.

Builds the ``100M`` preset (seq 512, batch 4) compiled as pretrain compiles it on CPU (regional compilation,
blocked causal attention, the LM head fused with the loss, fused AdamW; ``import training`` first: MKL's Intel
kernels on AMD CPUs; ``--malloc_keep``: glibc keeps freed memory, as pretrain sets it on CPU), runs two warm-up
steps, times ``--steps`` more, then profiles one with ``torch.profiler`` (shapes recorded). Reports the matrix
products (``mm``/``addmm``/``addmm_``/``bmm``) grouped by shape, with their GFLOP/s, their share of the step, and
the largest other ops. The products are the floor no fusion of the rest can lower: ``stock step time / our
product time`` is the most a faster rest could make the ratio to stock (with ``benchmarks/train_malloc.py``'s
stock time from the same machine). Writes ``train_profile.{json,md}`` to ``--out``.

    python benchmarks/train_profile.py --malloc_keep
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def _flops(name: str, shapes: list) -> float:
    """FLOPs of one call from its recorded input shapes (``addmm(_)`` and ``baddbmm``-like: the last two)."""
    a, b = (shapes[0], shapes[1]) if name in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    batch = a[0] if name == "aten::bmm" else 1
    m, k, n = a[-2], a[-1], b[-1]
    return 2.0 * batch * m * k * n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="100M")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps before the profiled one (default 8)")
    p.add_argument("--malloc_keep", action="store_true", help="call training.malloc_keep first (pretrain on CPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for train_profile.{json,md}")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from training import malloc_keep, mkl_amd

    if args.malloc_keep:
        malloc_keep.keep_freed_memory()
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_cpu import _compiled_as_pretrain, _train_ids, _train_step, _twins, write_results

    ours, _stock = _twins(args.preset)
    del _stock
    ids = _train_ids(ours.config.vocab_size, args.batch, args.seq)
    step = _train_step(_compiled_as_pretrain(ours), ids, "fp32", fused=True, compiled_loss=True)
    del ours
    step(), step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0

    groups = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in _PRODUCTS:
            seconds = e.self_cpu_time_total / 1e6
            flops = _flops(e.key, e.input_shapes) * e.count
            shapes = [s for s in e.input_shapes if s]
            groups.append(
                {
                    "op": e.key,
                    "shapes": shapes,
                    "calls": e.count,
                    "seconds": seconds,
                    "gflops_per_s": flops / seconds / 1e9 if seconds else 0.0,
                    "gflop": flops / 1e9,
                }
            )
    groups.sort(key=lambda g: -g["seconds"])
    product_s = sum(g["seconds"] for g in groups)
    product_gflop = sum(g["gflop"] for g in groups)
    others = sorted(
        (
            {"op": e.key, "calls": e.count, "seconds": e.self_cpu_time_total / 1e6}
            for e in prof.key_averages()
            if e.key not in _PRODUCTS
        ),
        key=lambda o: -o["seconds"],
    )[:12]
    result = {
        "preset": args.preset,
        "seq": args.seq,
        "batch": args.batch,
        "torch": torch.__version__,
        "mkl_amd": mkl_amd.state(),
        "malloc_keep": malloc_keep.state(),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "profiled_step_s": wall,
        "products_s": product_s,
        "products_share": product_s / wall,
        "products_gflop": product_gflop,
        "products_gflops_per_s": product_gflop / product_s,
        "groups": groups,
        "others": others,
    }
    lines = [
        f"fp32 training step of ours as `training.pretrain` runs it on CPU (`{args.preset}`, seq {args.seq}, batch "
        f"{args.batch}; MKL on AMD: {result['mkl_amd']}; malloc_keep: {result['malloc_keep']}): median step "
        f"{result['step_s_median']:.3f} s over {args.steps}; profiled step {wall:.3f} s, of which matrix products "
        f"{product_s:.3f} s ({100 * product_s / wall:.1f}%, {product_gflop:.0f} GFLOP at "
        f"{result['products_gflops_per_s']:.1f} GFLOP/s)",
        "",
        "| op | shapes | calls | s | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for g in groups:
        if g["seconds"] >= 0.01 * product_s:
            lines.append(f"| {g['op']} | {g['shapes']} | {g['calls']} | {g['seconds']:.3f} | {g['gflops_per_s']:.1f} |")
    rest = sum(g["seconds"] for g in groups if g["seconds"] < 0.01 * product_s)
    lines += [f"| (smaller products) | | | {rest:.3f} | |", "", "| other op (self time) | calls | s |", "|---|---|---|"]
    lines += [f"| {o['op'][:60]} | {o['calls']} | {o['seconds']:.3f} |" for o in others]
    write_results(args.out, "train_profile", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
