"""One decode step's attention on CPU: ``cpu_attention``'s kernel against the eager math compiled by inductor (what
``FastDecoder``'s step ran before) and SDPA, side by side in one process.

For each case, 12 separate static caches (one per layer, as a step reads them: from memory, not from cache) of
``S`` positions of which ``written`` hold keys (the rest masked, as a static cache's unwritten positions are), one
query row per (sequence, head). Reports microseconds per layer (median of rounds, the three alternating) and the
kernel's GB/s of keys and values read. Results are asserted equal to the eager math.

    python benchmarks/decode_attention.py [--rounds 7] [--out benchmarks/results/cpu-avx2]
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
import torch.nn.functional as F  # noqa: E402
from bench_cpu import run_meta, write_results  # noqa: E402

from modeling_llama import cpu_attention  # noqa: E402
from modeling_llama.modeling_llama import eager_attention_forward  # noqa: E402

LAYERS = 12


class _Module:
    training = False
    num_key_value_groups = 1


def _eager(q, k, v, mask, scale):
    return eager_attention_forward(_Module(), q, k, v, mask, scale)[0]


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def bench_case(batch: int, heads: int, head_dim: int, length: int, written: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim, generator=g)
    shape = (batch, heads, length, head_dim)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(LAYERS)]
    mask = torch.zeros(batch, 1, 1, length)
    mask[..., written:] = torch.finfo(torch.float32).min
    scale = head_dim**-0.5
    compiled = torch.compile(_eager, fullgraph=True, dynamic=False)
    fns = {"kernel": cpu_attention.decode_attention, "eager, compiled": compiled, "sdpa": _sdpa}
    ref = _eager(q.double(), caches[0][0].double(), caches[0][1].double(), mask.double(), scale)
    for name, fn in fns.items():
        torch.testing.assert_close(fn(q, *caches[0], mask, scale).double(), ref, rtol=1e-4, atol=1e-5, msg=name)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            fn = fns[name]
            t = time.perf_counter()
            for _ in range(5):
                for k, v in caches:
                    fn(q, k, v, mask, scale)
            times[name].append((time.perf_counter() - t) / (5 * LAYERS) * 1e6)
    us = {name: statistics.median(v) for name, v in times.items()}
    read = 2 * batch * heads * written * head_dim * 4  # the kernel reads the written keys and values once
    return {
        "batch": batch, "heads": heads, "head_dim": head_dim, "length": length, "written": written,
        "us_per_layer": {k: round(v, 1) for k, v in us.items()},
        "us_per_layer_rounds": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "kernel_GBps": round(read / us["kernel"] / 1e3, 2),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/cpu-avx2", help="folder for decode_attention.{json,md}")
    args = p.parse_args()
    if not cpu_attention.available():
        print("cpu_attention's kernel cannot be built here (no C++ compiler or torch headers): nothing to compare")
        return 1
    # 100M (12 heads of 64) at the bench's cache (97 positions, 65 written: the middle of its steps) and at a long
    # one; 7B's heads (32 of 128)
    cases = [(8, 12, 64, 97, 65), (1, 12, 64, 97, 65), (8, 12, 64, 2048, 65), (8, 12, 64, 2048, 1500)]
    cases += [(1, 32, 128, 2048, 1000)]
    rows = [bench_case(*c, args.rounds) for c in cases]
    md = (
        "| batch, heads x head size, cache positions (written) | kernel µs / layer | eager, compiled µs | SDPA µs "
        "| eager / kernel | kernel GB/s of K+V read |\n|---|---|---|---|---|---|\n"
    )
    for r in rows:
        u = r["us_per_layer"]
        md += (
            f"| {r['batch']}, {r['heads']} x {r['head_dim']}, {r['length']} ({r['written']}) | {u['kernel']:.0f} | "
            f"{u['eager, compiled']:.0f} | {u['sdpa']:.0f} | {u['eager, compiled'] / u['kernel']:.2f}x | "
            f"{r['kernel_GBps']:.1f} |\n"
        )
    write_results(args.out, "decode_attention", {"meta": run_meta(rounds=args.rounds), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
