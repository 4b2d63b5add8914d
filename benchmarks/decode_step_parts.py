"""The batch-8 decode step with and without each of its CPU kernels' parts, side by side in one process.

``FastDecoder`` at batch 2-16 on CPU runs its step's products through ``cpu_linear``'s op (85 calls per token,
``100M`` preset; its CPU implementation is C++ where it builds, Python otherwise) and its one-row attention through
``cpu_attention``'s kernel (else the eager math, which inductor fuses). This script builds five decoders on five
copies of one model (ours; runs before 2026-11-30's seventh session used stock transformers' model with the same
weights) and alternates their ``generate`` calls:

- ``all``: what ``FastDecoder`` runs here (the op in C++, the attention kernel);
- ``eager attention``: the same with the step's attention left to inductor (``attn_implementation="eager"``);
- ``op in Python``: the same with the product op's Python implementation (registered here as a second op);
- ``C++ wrapper``: ``all`` with the step's wrapper compiled to C++ (``FastDecoder(cpp_wrapper=True)``);
- ``4 KB pages``: ``all`` with the weights left where torch allocated them (``FastDecoder(huge_pages=False)``;
  ``all`` moves them to transparent huge pages where the system has them).

It reports each op call's cost alone (a tiny product), the steady step (``(generate of 1 + N new tokens -
generate of 1) / N``) as medians and as the median of per-round ratios to ``all``, and asserts the decoders'
tokens equal.

    python benchmarks/decode_step_parts.py [--rounds 12] [--out benchmarks/results/cpu-avx2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cpu import _twins, run_meta, write_results  # noqa: E402

from modeling_llama import FastDecoder, cpu_attention, cpu_linear, fast_decode  # noqa: E402

_LIB = torch.library.Library("llama_hf_bench", "DEF")
_LIB.define("small_batch_linear_python(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("small_batch_linear_python", cpu_linear._small_batch_linear, "CPU")
torch.library.register_fake("llama_hf_bench::small_batch_linear_python", cpu_linear._fake, lib=_LIB)


def _python_op_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.llama_hf_bench.small_batch_linear_python(x, self.weight)
    return fast_decode._eager_linear(self, x)


def call_cost(op, rows: int = 8, calls: int = 2000) -> float:
    """Microseconds per call of ``op`` on a tiny (rows, 64) x (64, 16) product: the call's own cost."""
    x, w = torch.randn(rows, 64), torch.randn(16, 64)
    for _ in range(100):
        op(x, w)
    t = time.perf_counter()
    for _ in range(calls):
        op(x, w)
    return (time.perf_counter() - t) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="100M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12, help="rounds of one timed run per decoder, order rotating")
    p.add_argument("--out", default="benchmarks/results/cpu-avx2", help="folder for decode_step_parts.{json,md}")
    args = p.parse_args()
    if not (cpu_linear.native() and cpu_attention.available()):
        print("the C++ kernels cannot be built here (no C++ compiler or torch headers): nothing to compare")
        return 1
    if not 2 <= args.batch <= cpu_linear.MAX_ROWS:
        p.error(f"--batch must be 2..{cpu_linear.MAX_ROWS} (the batches that call the op)")

    native_op, python_op = torch.ops.llama_hf.small_batch_linear, torch.ops.llama_hf_bench.small_batch_linear_python
    costs = {"cpp": [], "python": []}
    for _ in range(3):
        costs["cpp"].append(call_cost(native_op, args.batch))
        costs["python"].append(call_cost(python_op, args.batch))

    model, _ = _twins(args.preset)
    names = ["all", "eager attention", "op in Python", "C++ wrapper", "4 KB pages"]
    models = {name: model if name == "all" else copy.deepcopy(model) for name in names}
    max_length = args.prompt + args.new_tokens + 1
    attn = {"eager attention": "eager"}  # the step's attention left to inductor
    decoders = {
        name: FastDecoder(
            m,
            args.batch,
            max_length,
            attn_implementation=attn.get(name),
            cpp_wrapper=name == "C++ wrapper",
            huge_pages=name != "4 KB pages",
        )
        for name, m in models.items()
    }
    for module in models["op in Python"].modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _python_op_forward.__get__(module)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    tokens = {name: dec.generate(prompt, args.new_tokens + 1) for name, dec in decoders.items()}  # compiles
    for name in decoders:
        assert torch.equal(tokens[name], tokens["all"]), f"{name} gave other tokens than all"

    steps = {name: [] for name in names}
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each decoder first in turn
            dec = decoders[name]
            t = time.perf_counter()
            dec.generate(prompt, 1)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            dec.generate(prompt, args.new_tokens + 1)
            steps[name].append((time.perf_counter() - t - prefill) / args.new_tokens * 1e3)
    ratios = {n: statistics.median(x / a for x, a in zip(steps[n], steps["all"])) for n in names}
    result = {
        "meta": run_meta(preset=args.preset, batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                         rounds=args.rounds),
        "op_call_us": {k: [round(v, 2) for v in vs] for k, vs in costs.items()},
        "huge_page_bytes": {n: dec.huge_page_bytes for n, dec in decoders.items()},
        "step_ms": {k: [round(v, 3) for v in vs] for k, vs in steps.items()},
        "step_ms_median": {k: round(statistics.median(v), 3) for k, v in steps.items()},
        "step_over_all_median_of_rounds": {k: round(v, 4) for k, v in ratios.items()},
    }  # fmt: skip
    md = (
        f"| batch {args.batch}, `{args.preset}`, prompt {args.prompt} + {args.new_tokens} new, {args.rounds} rounds "
        "| steady step, ms (median) | step / `all` (median of rounds) |\n|---|---|---|\n"
        + "".join(f"| {n} | {result['step_ms_median'][n]:.2f} | {ratios[n]:.3f}x |\n" for n in names)
        + f"\nOne call of the product op on a tiny product (best of 3): C++ {min(costs['cpp']):.1f} µs, "
        f"Python {min(costs['python']):.1f} µs.\n"
    )
    write_results(args.out, "decode_step_parts", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
