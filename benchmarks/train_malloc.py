"""The CPU training step with and without glibc keeping freed memory (``training.malloc_keep``), side by side.

Three child processes hold one model each and take turns, one step at a time (the order reversed every round, so
that drifting machine load hits all alike):

- ``stock``: stock ``transformers.LlamaForCausalLM`` in a plain process (no MKL switch, glibc's defaults);
- ``ours``: ours as ``training.pretrain --compile true`` ran it before ``malloc_keep`` (MKL's Intel kernels on AMD,
  regional compilation, blocked causal attention, the LM head fused with the loss), glibc's defaults;
- ``ours_keep``: the same with ``malloc_keep.keep_freed_memory()`` called first, as ``training.pretrain`` runs it
  on the CPU now.

Same weights, batch and fused AdamW in all three (``bench_cpu.py``'s step functions). Reported per child: the
median step time, the median of the per-round time ratios to ``ours``, minor page faults per step and peak
resident memory; and ``ours_keep`` against ``stock``. Writes ``train_malloc.{json,md}`` to ``--out``.

    python benchmarks/train_malloc.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = ("stock", "ours", "ours_keep")


def child(kind: str, preset: str, seq: int, batch: int) -> None:
    sys.path.insert(0, str(REPO))
    from training import malloc_keep

    if kind == "ours_keep":
        malloc_keep.keep_freed_memory()
    import training  # noqa: F401  (the MKL switch, unless LLAMA_MKL_AMD=0: the parent sets it for stock)
    from training import mkl_amd

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_cpu import _compiled_as_pretrain, _train_ids, _train_step, _twins

    ours, stock = _twins(preset)
    ids = _train_ids(ours.config.vocab_size, batch, seq)
    if kind == "stock":
        step = _train_step(stock, ids, "fp32", fused=False, compiled_loss=False)
    else:
        step = _train_step(_compiled_as_pretrain(ours), ids, "fp32", fused=True, compiled_loss=True)
    del ours, stock
    step(), step()  # warm-up (and compilation)
    print("@@ " + json.dumps({"mkl_amd": mkl_amd.state(), "malloc_keep": malloc_keep.state()}), flush=True)
    for _ in sys.stdin:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        reply = {"seconds": seconds, "loss": loss, "faults": usage.ru_minflt - f0, "maxrss_mb": usage.ru_maxrss / 1024}
        print("@@ " + json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="100M")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per child (default 10)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for train_malloc.{json,md}")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.preset, args.seq, args.batch)
        return 0

    procs = {}
    for kind in KINDS:
        env = {**os.environ, "LLAMA_MKL_AMD": "0" if kind == "stock" else "1"}
        cmd = [sys.executable, __file__, "--child", kind, "--preset", args.preset, "--seq", str(args.seq)]
        cmd += ["--batch", str(args.batch)]
        procs[kind] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(kind: str, go: bool) -> dict:
        proc = procs[kind]
        if go:
            proc.stdin.write("step\n")
            proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"child {kind} exited with {proc.wait()}")

    try:
        ready = {kind: ask(kind, go=False) for kind in KINDS}
        replies = {kind: [] for kind in KINDS}
        for r in range(args.rounds):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                replies[kind].append(ask(kind, go=True))
                print(f"round {r + 1}/{args.rounds} {kind}: {replies[kind][-1]['seconds']:.2f} s", flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()

    def ratios(a: str, b: str) -> list[float]:
        return [x["seconds"] / y["seconds"] for x, y in zip(replies[a], replies[b])]

    rows = {}
    for kind in KINDS:
        rs = ratios(kind, "ours")
        rows[kind] = {
            **ready[kind],
            "median_s": statistics.median(x["seconds"] for x in replies[kind]),
            "tokens_per_s": args.batch * args.seq / statistics.median(x["seconds"] for x in replies[kind]),
            "time_vs_ours_median": statistics.median(rs),
            "time_vs_ours_range": [min(rs), max(rs)],
            "faults_per_step_median": statistics.median(x["faults"] for x in replies[kind]),
            "maxrss_mb": replies[kind][-1]["maxrss_mb"],
            "first_loss": replies[kind][0]["loss"],
            "seconds": [x["seconds"] for x in replies[kind]],
        }
    speedup = {k: 1 / statistics.median(ratios(k, "stock")) for k in ("ours", "ours_keep")}
    result = {
        "preset": args.preset,
        "seq": args.seq,
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
        "speedup_vs_stock": speedup,
        "cpu": _cpu_name(),
    }
    lines = [
        f"fp32 training step, `{args.preset}`, seq {args.seq}, batch {args.batch}, {args.rounds} rounds "
        f"({result['cpu']})",
        "",
        "| child | median step s | tok/s | time / ours (median of rounds, range) | page faults per step | "
        "peak RSS MB | vs stock (median of per-round ratios) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, row in rows.items():
        lo, hi = row["time_vs_ours_range"]
        vs = f"{speedup[kind]:.3f}x" if kind in speedup else ""
        lines.append(
            f"| {kind} | {row['median_s']:.3f} | {row['tokens_per_s']:.1f} | {row['time_vs_ours_median']:.4f}x "
            f"({lo:.3f}-{hi:.3f}) | {row['faults_per_step_median']:.0f} | {row['maxrss_mb']:.0f} | {vs} |"
        )
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_malloc.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "train_malloc.md").write_text(md)
    print(md)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
