"""What the C++ implementation of ``cpu_linear``'s op saves in the batch-8 decode step, side by side in one process.

``FastDecoder`` at batch 2-16 on CPU calls ``torch.ops.llama_hf.small_batch_linear`` 85 times per token (``100M``
preset). Its CPU implementation is C++ where it can be built (``cpu_linear.native()``), Python otherwise; both call
the same kernel. This script registers the Python implementation as a second op (``llama_hf_bench::...``), builds
two decoders on two copies of one model, one calling each op from its compiled step, and alternates their
``generate`` calls. It reports each call's cost alone (the op on a tiny product) and the steady step
(``(generate of 1 + N new tokens - generate of 1) / N``), medians and the median of per-pair ratios; the tokens of
the two decoders are asserted equal.

    python benchmarks/decode_op_overhead.py [--pairs 16] [--out benchmarks/results/cpu-avx2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cpu import _cpu_info, _twins  # noqa: E402

from modeling_llama import FastDecoder, cpu_linear, fast_decode  # noqa: E402

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
    p.add_argument("--pairs", type=int, default=16, help="alternating (C++, Python) pairs of timed runs")
    p.add_argument("--out", default="benchmarks/results/cpu-avx2", help="folder for op_overhead.{json,md}")
    args = p.parse_args()
    if not cpu_linear.native():
        print("cpu_linear's op has no C++ implementation here (no C++ compiler or torch headers): nothing to compare")
        return 1
    if not 2 <= args.batch <= cpu_linear.MAX_ROWS:
        p.error(f"--batch must be 2..{cpu_linear.MAX_ROWS} (the batches that call the op)")

    native_op, python_op = torch.ops.llama_hf.small_batch_linear, torch.ops.llama_hf_bench.small_batch_linear_python
    costs = {"cpp": [], "python": []}
    for _ in range(3):
        costs["cpp"].append(call_cost(native_op, args.batch))
        costs["python"].append(call_cost(python_op, args.batch))

    _, model = _twins(args.preset)
    twin = copy.deepcopy(model)
    max_length = args.prompt + args.new_tokens + 1
    decoders = {"cpp": FastDecoder(model, args.batch, max_length), "python": FastDecoder(twin, args.batch, max_length)}
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _python_op_forward.__get__(module)
    prompt = torch.randint(
        0, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    tokens = {name: dec.generate(prompt, args.new_tokens + 1) for name, dec in decoders.items()}  # compiles
    assert torch.equal(tokens["cpp"], tokens["python"]), "the two implementations gave different tokens"

    steps = {"cpp": [], "python": []}
    for i in range(args.pairs):
        for name in ("cpp", "python") if i % 2 == 0 else ("python", "cpp"):
            dec = decoders[name]
            t = time.perf_counter()
            dec.generate(prompt, 1)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            dec.generate(prompt, args.new_tokens + 1)
            steps[name].append((time.perf_counter() - t - prefill) / args.new_tokens * 1e3)
    ratios = [py / cpp for py, cpp in zip(steps["python"], steps["cpp"])]
    result = {
        "meta": {"cpu": _cpu_info(), "torch": torch.__version__, "preset": args.preset, "batch": args.batch,
                 "prompt": args.prompt, "new_tokens": args.new_tokens, "pairs": args.pairs,
                 "date": time.strftime("%Y-%m-%d")},
        "call_us": {k: [round(v, 2) for v in vs] for k, vs in costs.items()},
        "step_ms": {k: [round(v, 3) for v in vs] for k, vs in steps.items()},
        "step_ms_median": {k: round(statistics.median(v), 3) for k, v in steps.items()},
        "python_over_cpp_median_of_pairs": round(statistics.median(ratios), 4),
    }  # fmt: skip
    md = (
        f"| batch {args.batch}, `{args.preset}`, prompt {args.prompt} + {args.new_tokens} new | one call, µs "
        "(tiny product) | steady step, ms (median) |\n|---|---|---|\n"
        f"| op in C++ | {min(costs['cpp']):.1f} | {result['step_ms_median']['cpp']:.2f} |\n"
        f"| op in Python | {min(costs['python']):.1f} | {result['step_ms_median']['python']:.2f} |\n"
        f"| Python / C++ (median of {args.pairs} pairs) | | {result['python_over_cpp_median_of_pairs']:.3f}x |\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "op_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
