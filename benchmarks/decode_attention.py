"""One decode step's attention on CPU: ``cpu_attention``'s kernel against the eager math compiled by inductor (what
``FastDecoder``'s step ran before) and SDPA, side by side in one process.

For each case, 12 separate static caches (one per layer, as a step reads them: from memory, not from cache) of
``S`` positions of which ``written`` hold keys (the rest masked, as a static cache's unwritten positions are), one
query row per (sequence, head). Reports microseconds per layer (median of rounds, the three alternating) and the
kernel's GB/s of keys and values read. Results are asserted equal to the eager math.

    python benchmarks/decode_attention.py [--rounds 7] [--dtype bfloat16] [--out benchmarks/results/cpu-avx2]

``--dtype bfloat16`` runs the same in bf16 (queries, keys and values; the file names get ``_bf16``). With
``--against REV`` the kernel's source at git revision ``REV`` (``modeling_llama/cpu_attention.py`` there, built as
an op of another namespace) runs beside this tree's as a fourth column (files ``decode_attention_against_<REV>``).
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
from bench_cpu import run_meta, source_at, write_results  # noqa: E402

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


def kernel_at(rev: str):
    """``cpu_attention``'s kernel as it was at git revision ``rev``, as the op ``llama_hf_rev::decode_attention``
    (with its fake, so a compiled step can call it)."""
    src = source_at(rev, "modeling_llama/cpu_attention.py")
    src = src.replace("TORCH_LIBRARY_IMPL(llama_hf,", "TORCH_LIBRARY_IMPL(llama_hf_rev,")
    lib = torch.library.Library("llama_hf_rev", "FRAGMENT")
    lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
    torch.library.register_fake("llama_hf_rev::decode_attention", cpu_attention._fake, lib=lib)
    _REV_LIBS.append(lib)  # (the registrations live as long as the Library)
    path = cpu_attention._build("llama_hf_attention_rev", src)
    if path is None:
        raise SystemExit(f"the kernel at {rev!r} did not build")
    torch.ops.load_library(str(path))
    return torch.ops.llama_hf_rev.decode_attention


_REV_LIBS: list = []


def bench_case(
    batch: int, heads: int, head_dim: int, length: int, written: int, rounds: int, dtype=torch.float32, rev=None
) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
    shape = (batch, heads, length, head_dim)
    caches = [
        (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)) for _ in range(LAYERS)
    ]
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype)
    mask[..., written:] = torch.finfo(dtype).min
    scale = head_dim**-0.5
    compiled = torch.compile(_eager, fullgraph=True, dynamic=False)
    fns = {"kernel": cpu_attention.decode_attention, "eager, compiled": compiled, "sdpa": _sdpa}
    if rev is not None:
        fns["kernel at " + rev[0]] = rev[1]
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: the eager math rounds its scores and weights to bf16
    ref = _eager(q.double(), caches[0][0].double(), caches[0][1].double(), mask.double(), scale)
    for name, fn in fns.items():
        torch.testing.assert_close(
            fn(q, *caches[0], mask, scale).double(),
            ref,
            rtol=tol,
            atol=tol / 10 if dtype == torch.float32 else tol,
            msg=name,
        )
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t = time.perf_counter()
            for _ in range(5):
                for k, v in caches:
                    fn(q, k, v, mask, scale)
            times[name].append((time.perf_counter() - t) / (5 * LAYERS) * 1e6)
    us = {name: statistics.median(v) for name, v in times.items()}
    read = 2 * batch * heads * written * head_dim * q.element_size()  # the written keys and values, read once
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
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--against", metavar="REV", help="add the kernel at this git revision as a column")
    args = p.parse_args()
    if not cpu_attention.available():
        print("cpu_attention's kernel cannot be built here (no C++ compiler or torch headers): nothing to compare")
        return 1
    dtype = getattr(torch, args.dtype)
    rev = (args.against, kernel_at(args.against)) if args.against else None
    # 100M (12 heads of 64) at the bench's cache (97 positions, 65 written: the middle of its steps) and at a long
    # one; 7B's heads (32 of 128)
    cases = [(8, 12, 64, 97, 65), (1, 12, 64, 97, 65), (8, 12, 64, 2048, 65), (8, 12, 64, 2048, 1500)]
    cases += [(1, 32, 128, 2048, 1000)]
    rows = [bench_case(*c, args.rounds, dtype, rev) for c in cases]
    other = f"kernel at {args.against}" if args.against else None
    md = (
        "| batch, heads x head size, cache positions (written) | kernel µs / layer | eager, compiled µs | SDPA µs "
        "| eager / kernel | kernel GB/s of K+V read |"
        + (f" {other} µs | {other} / kernel |" if other else "")
        + "\n|---|---|---|---|---|---|"
        + ("---|---|" if other else "")
        + "\n"
    )
    for r in rows:
        u = r["us_per_layer"]
        md += (
            f"| {r['batch']}, {r['heads']} x {r['head_dim']}, {r['length']} ({r['written']}) | {u['kernel']:.0f} | "
            f"{u['eager, compiled']:.0f} | {u['sdpa']:.0f} | {u['eager, compiled'] / u['kernel']:.2f}x | "
            f"{r['kernel_GBps']:.1f} |" + (f" {u[other]:.0f} | {u[other] / u['kernel']:.2f}x |" if other else "") + "\n"
        )
    md += f"\n({args.dtype}; medians of {args.rounds} rounds, the functions alternating.)\n"
    stem = "decode_attention" + (f"_against_{args.against}" if args.against else "")
    stem += "_bf16" if dtype == torch.bfloat16 else ""
    write_results(args.out, stem, {"meta": run_meta(rounds=args.rounds, dtype=args.dtype), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
