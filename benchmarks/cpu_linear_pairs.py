"""``cpu_linear``'s kernel taking one weight row at a time against two (both loading each piece of the input rows
once per pass), side by side in one process, on the products of one decode step.

The kernel is built three times from its own source (as the module builds it, ``cpu_linear._build_kernel``),
differing only in ``PAIR_MIN_K``, the K from which it takes two weight rows at a time: never, the default (4,096),
and always. Each build runs the same sequences of products (weights far larger than any cache, read in a step's
order), the builds alternating round by round; every build's result is asserted equal to ``F.linear``'s. Reports
ms per sequence (median of rounds) and GB/s of weights.

    python benchmarks/cpu_linear_pairs.py [--rows 2 4 8 16] [--rounds 20] [--out benchmarks/results/cpu-avx2]

With ``--against REV`` it compares the kernel's source at git revision ``REV`` (``modeling_llama/cpu_linear.py``
there) with this tree's instead, both with their own defaults, and writes ``cpu_linear_against_<REV>.{json,md}``.
Every build gets the flags the module adds for this CPU's vendor (the prefetch hint: ``cpu_linear._vendor_defines``;
a source that predates them ignores them). ``--dtype bfloat16`` times the bf16 entry (bf16 weights; the suffix
``_bf16`` on the file names), ``--torch`` adds torch's ``F.linear`` on the same weights as a column.

With ``--prefetch`` it compares the kernel's software-prefetch forms instead (``cpu_linear_prefetch.{json,md}``):
the non-temporal hint with no prefetch in the one-row form (what non-Intel CPUs build), the T0 hint with the one-row
form prefetching too (what Intel CPUs build), and the T1 hint with both; each build names both defines, so the
vendor's own do not decide.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cpu import run_meta, source_at, write_results  # noqa: E402

from modeling_llama import cpu_linear  # noqa: E402

BUILDS = {"one row": 1 << 62, "default": None, "two rows": 0}  # PAIR_MIN_K (None: the source's own)
PREFETCH_BUILDS = {  # --prefetch: __builtin_prefetch's locality (0: non-temporal, 3: T0, 2: T1), one-row prefetch
    "nta": ["-DPREFETCH_HINT=0", "-DPREFETCH_ROW1=0"],
    "t0 + one-row": ["-DPREFETCH_HINT=3", "-DPREFETCH_ROW1=1"],
    "t1 + one-row": ["-DPREFETCH_HINT=2", "-DPREFETCH_ROW1=1"],
}


def _sequences() -> dict[str, list[tuple[int, int]]]:
    """(N, K) of each product, in a step's order: the 100M preset's 85, two of LLaMA-7B's layers."""
    h, i, v = 768, 2048, 32000
    small = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]
    big = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    return {
        "100M step (85 products)": small * 12 + [(v, h)],
        "100M down projections (768 x 2048) x 24": [(h, i)] * 24,
        "7B, two layers (14 products)": big * 2,
    }


def _build(builds: dict[str, tuple[str, list[str]]], dtype: torch.dtype = torch.float32) -> dict:
    """name -> (C source, extra flags): each compiled (cached like the module's kernel), its entry for weights of
    ``dtype`` by name."""
    fns = {}
    entry = "llama_small_batch_linear" + ("_bf16" if dtype == torch.bfloat16 else "")
    for name, (source, defines) in builds.items():
        stem = "llama_small_batch_linear_bench"
        lib = cpu_linear._build_kernel(stem, source, defines)
        if lib is None:
            raise SystemExit("no C compiler ($CC, cc, gcc, clang) built the kernel: nothing to compare")
        so = ctypes.CDLL(str(lib))
        fn = getattr(so, entry)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, i64, i64, ptr]  # x, M, w, N, K, y
        # the bf16 entry's rows and output: bf16 since 2026-12-01 (llama_small_batch_linear_bf16_io), float32 before
        fn.bf16_io = dtype == torch.bfloat16 and hasattr(so, "llama_small_batch_linear_bf16_io")
        fns[name] = fn
    return fns


def bench(fns: dict, shapes: list[tuple[int, int]], rows: int, rounds: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(rows)
    ws = [(torch.randn(n, k, generator=g) * 0.02).to(dtype) for n, k in shapes]
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    # the bf16 entry's rows and output: bf16 (float32 rows holding bf16 values for a source before 2026-12-01)
    xt = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
    xs = {k: x.float() for k, x in xt.items()}
    ys = {n: torch.empty(rows, n) for n in {n for n, _ in shapes}}
    yt = {n: torch.empty(rows, n, dtype=dtype) for n in {n for n, _ in shapes}}
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    io = {name: (xt, yt) if getattr(fn, "bf16_io", False) else (xs, ys) for name, fn in fns.items()}
    for name, fn in fns.items():
        if fn is None:
            continue
        x_in, y_out = io[name]
        for w in ws[:8]:
            n, k = w.shape
            fn(x_in[k].data_ptr(), rows, w.data_ptr(), n, k, y_out[n].data_ptr())
            torch.testing.assert_close(y_out[n].float(), xs[k] @ w.float().T, rtol=tol, atol=tol, msg=name)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t = time.perf_counter()
            if fn is None:  # torch's F.linear on the same weights, x in their dtype
                for w in ws:
                    torch.nn.functional.linear(xt[w.shape[1]], w)
            else:
                x_in, y_out = io[name]
                for w in ws:
                    n, k = w.shape
                    fn(x_in[k].data_ptr(), rows, w.data_ptr(), n, k, y_out[n].data_ptr())
            times[name].append((time.perf_counter() - t) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {
        "rows": rows,
        "MB": round(nbytes / 1e6),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "GBps": {k: round(nbytes / v / 1e6, 2) for k, v in ms.items()},
        "ms_rounds": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/cpu-avx2", help="folder for the .json and .md")
    p.add_argument("--against", metavar="REV", help="compare the kernel at this git revision with this tree's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' dtype")
    p.add_argument("--torch", action="store_true", help="add torch's F.linear on the same weights as a column")
    p.add_argument("--prefetch", action="store_true", help="compare the prefetch forms (hint, one-row prefetch)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.against and args.prefetch:
        p.error("--against and --prefetch are two different comparisons; pass one of them")
    if args.prefetch:
        builds = {name: (cpu_linear._SOURCE, defines) for name, defines in PREFETCH_BUILDS.items()}
        stem = "cpu_linear_prefetch"
    elif args.against:
        builds = {
            args.against: (source_at(args.against, "modeling_llama/cpu_linear.py"), []),
            "this tree": (cpu_linear._SOURCE, []),
        }
        stem = "cpu_linear_against_" + "".join(c if c.isalnum() else "_" for c in args.against)
    else:
        builds = {
            name: (cpu_linear._SOURCE, [] if k is None else [f"-DPAIR_MIN_K={k}LL"]) for name, k in BUILDS.items()
        }
        stem = "cpu_linear_pairs"
    if dtype == torch.bfloat16:
        stem += "_bf16"
    fns = _build(builds, dtype)
    if args.torch:
        fns["F.linear"] = None
    results = []
    for label, shapes in _sequences().items():
        for rows in args.rows:
            row = {"sequence": label, **bench(fns, shapes, rows, args.rounds, dtype)}
            results.append(row)
            print(label, rows, row["GBps"], flush=True)
    names = list(fns)
    first = names[0]
    md = (
        "| products | rows | MB | " + " | ".join(f"{n} GB/s" for n in names) + " | "
        + " | ".join(f"{n} / {first}" for n in names[1:]) + " |\n|---|---|---|" + "---|" * (2 * len(names) - 1) + "\n"
    )  # fmt: skip
    for r in results:
        gb, ms = r["GBps"], r["ms"]
        md += (
            f"| {r['sequence']} | {r['rows']} | {r['MB']} | " + " | ".join(f"{gb[n]:.1f}" for n in names) + " | "
            + " | ".join(f"{ms[first] / ms[n]:.3f}x" for n in names[1:]) + " |\n"
        )  # fmt: skip
    md += f"\n(x: speed relative to {first}, from the medians of {args.rounds} alternating rounds.)\n"
    meta = run_meta(rounds=args.rounds, threads=torch.get_num_threads(), builds=names, dtype=args.dtype)
    write_results(args.out, stem, {"meta": meta, "rows": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
