"""``cpu_linear``'s two bf16 products side by side through their ops, by row count: the row form
(``small_batch_linear`` on the weights as the model holds them) and the packed form (``packed_linear`` on copies
packed by ``pack_weight``), over the products of one decode step of a preset (q/k/v and gate/up stacked, as
``FastDecoder`` runs them, and the LM head), each weight read once from memory per pass.

This is what decides from which batch ``FastDecoder`` packs its weights by default (``PACKED_MIN_BATCH``): each
call includes the op's dispatch, as in the compiled step. Beyond ``cpu_linear.MAX_ROWS`` rows the row form's op is
``F.linear`` (oneDNN's bf16 GEMM), what an eager prefill runs: ``--rows 32,64,256 --stem packed_rows_prefill``
compares the packed form with it there. Every packed result is checked against the row form's
(within one bf16 rounding of each other: both sum in float32, in other orders).

    python benchmarks/packed_rows.py [--rows 1,2,4,8,16] [--rounds 9] [--out benchmarks/results/cpu-zen5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cpu import run_meta, write_results  # noqa: E402

from modeling_llama import LlamaConfig, cpu_linear  # noqa: E402


def step_shapes(preset: str) -> list[tuple[int, int]]:
    """(N, K) of one decode step's products: per layer q/k/v stacked, o, gate/up stacked, down; then the LM head."""
    c = LlamaConfig.from_preset(preset)
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (d // c.num_attention_heads)
    return [(d + 2 * kv, d), (d, d), (2 * f, d), (d, f)] * layers + [(c.vocab_size, d)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="100M")
    p.add_argument("--rows", default="1,2,4,8,16", help="comma-separated row counts")
    p.add_argument("--rounds", type=int, default=9, help="timed passes per form and row count, forms alternating")
    p.add_argument("--out", default="benchmarks/results/cpu-zen5", help="folder for <stem>.{json,md}")
    p.add_argument("--stem", default="packed_rows", help="the result files' name")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]
    if not cpu_linear.available(torch.bfloat16) or not cpu_linear.forms().get("packed"):
        print("cpu_linear's kernel cannot be built here (no C compiler): nothing to compare")
        return 1
    cpu_linear.native()  # the ops' C++ dispatch, as FastDecoder runs them
    shapes = step_shapes(args.preset)
    if not all(n % 32 == 0 and k % 2 == 0 for n, k in shapes):
        p.error(f"the {args.preset} preset has products that cannot be packed: {shapes}")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes]
    packed = [cpu_linear.pack_weight(w) for w in weights]
    gb = sum(w.numel() * 2 for w in weights) / 1e9
    table = []
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in {k for _, k in shapes}}
        for w, q in zip(weights[:5], packed[:5]):  # the two forms agree (within a bf16 rounding of each other)
            a, b = cpu_linear.small_batch_linear(xs[w.shape[1]], w), cpu_linear.packed_linear(xs[w.shape[1]], q)
            assert ((a.double() - b.double()).abs() <= 2**-7 * a.double().abs() + 1e-2).all(), rows
        times = {"rows": [], "packed": []}
        for r in range(args.rounds):
            for form in ("rows", "packed") if r % 2 == 0 else ("packed", "rows"):
                t = time.perf_counter()
                if form == "rows":
                    for w in weights:
                        torch.ops.llama_hf.small_batch_linear(xs[w.shape[1]], w)
                else:
                    for q in packed:
                        torch.ops.llama_hf.packed_linear(xs[q.shape[1] * 2], q)
                times[form].append(time.perf_counter() - t)
        ratios = [a / b for a, b in zip(times["rows"], times["packed"])]
        table.append(
            {
                "rows": rows,
                "rows_GBps": gb / statistics.median(times["rows"]),
                "packed_GBps": gb / statistics.median(times["packed"]),
                "packed_speedup_median_of_rounds": statistics.median(ratios),
                "rows_s": times["rows"],
                "packed_s": times["packed"],
            }
        )
        print(f"{rows} rows: rows form {table[-1]['rows_GBps']:.1f} GB/s, packed {table[-1]['packed_GBps']:.1f} GB/s, "
              f"packed {table[-1]['packed_speedup_median_of_rounds']:.2f}x")  # fmt: skip
    result = {
        "meta": run_meta(preset=args.preset, rounds=args.rounds, weight_GB=gb, forms=cpu_linear.forms()),
        "table": table,
    }
    md = (
        f"| `{args.preset}` step products ({gb * 1e3:.0f} MB of bf16 weights), through the ops "
        f"| rows form GB/s (F.linear beyond {cpu_linear.MAX_ROWS} rows) "
        "| packed GB/s | packed speed-up (median of rounds) |\n|---|---|---|---|\n"
        + "".join(
            f"| {t['rows']} rows | {t['rows_GBps']:.1f} | {t['packed_GBps']:.1f} | "
            f"{t['packed_speedup_median_of_rounds']:.2f}x |\n"
            for t in table
        )
    )
    write_results(args.out, args.stem, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
