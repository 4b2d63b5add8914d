"""The batch-8 decode step with and without each of its CPU kernels' parts, side by side in one process.

``FastDecoder`` at batch 2-16 on CPU runs its step's products through ``cpu_linear``'s op (85 calls per token,
``100M`` preset; its CPU implementation is C++ where it builds, Python otherwise) and its one-row attention through
``cpu_attention``'s kernel (else the eager math, which inductor fuses). This script builds six decoders on six
copies of one model (ours; runs before 2026-11-30's seventh session used stock transformers' model with the same
weights) and alternates their ``generate`` calls:

- ``all``: what ``FastDecoder`` runs here (the op in C++, the attention kernel);
- ``eager attention``: the same with the step's attention left to inductor (``attn_implementation="eager"``);
- ``op in Python``: the same with the product op's Python implementation (registered here as a second op);
- ``C++ wrapper``: ``all`` with the step's wrapper compiled to C++ (``FastDecoder(cpp_wrapper=True)``);
- ``4 KB pages``: ``all`` with the weights left where torch allocated them (``FastDecoder(huge_pages=False)``;
  ``all`` moves them to transparent huge pages where the system has them);
- ``unpacked weights``: ``all`` with the weights read as the model holds them (``FastDecoder(packed_weights=False)``;
  in bf16 on a CPU with AVX512-BF16 ``all`` reads packed copies from batch 8 on, ``cpu_linear.packed_linear``).

It reports each op call's cost alone (a tiny product), the steady step (``(generate of 1 + N new tokens -
generate of 1) / N``) as medians and as the median of per-round ratios to ``all``, and asserts the decoders'
tokens equal.

    python benchmarks/decode_step_parts.py [--rounds 12] [--out benchmarks/results/cpu-avx2]

With ``--against REV`` a seventh decoder, ``kernels at REV``, runs the CPU kernels as they were at git revision
``REV`` (``cpu_linear``'s C kernel and C++ glue, ``cpu_attention``'s kernel, built from that revision's sources as
ops of the namespace ``llama_hf_rev``), with the step's size asserts back on where ``REV`` had them: the step of one
revision against another's, side by side (files ``decode_step_parts_against_<REV>``); where ``REV`` has the packed
product (``packed_linear``), that decoder packs its weights as ``all`` does and runs ``REV``'s packed op. Its tokens
may differ from ``all``'s where the revisions sum in other orders; they are reported, not asserted (as are
``eager attention``'s in bf16, where inductor's math rounds the scores and weights to bf16).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_cpu import _twins, file_at, run_meta, source_at, write_results  # noqa: E402
from decode_attention import kernel_at as attention_kernel_at  # noqa: E402

from modeling_llama import FastDecoder, cpu_attention, cpu_linear, fast_decode  # noqa: E402

_LIB = torch.library.Library("llama_hf_bench", "DEF")
_LIB.define("small_batch_linear_python(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("small_batch_linear_python", cpu_linear._small_batch_linear, "CPU")
torch.library.register_fake("llama_hf_bench::small_batch_linear_python", cpu_linear._fake, lib=_LIB)


def _python_op_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.llama_hf_bench.small_batch_linear_python(x, self.weight)
    return fast_decode._eager_linear(self, x)


REV_ATTENTION = "llama_hf_decode_rev"
_REV_LIB = None
REV_PACKED = False  # whether the revision given to kernels_at has the packed product (its decoder then packs)


def kernels_at(rev: str) -> bool:
    """Build ``cpu_linear``'s kernel and glue and ``cpu_attention``'s kernel from git revision ``rev`` as the ops
    ``llama_hf_rev::small_batch_linear`` and ``llama_hf_rev::decode_attention`` (``decode_attention.kernel_at``),
    and register the attention implementation :data:`REV_ATTENTION` that calls the latter. Returns whether ``rev``
    compiled the step without size asserts (this tree's ``FastDecoder`` does since 2026-12-01)."""
    global _REV_LIB
    _REV_LIB = torch.library.Library("llama_hf_rev", "FRAGMENT")
    _REV_LIB.define("small_batch_linear(Tensor x, Tensor weight) -> Tensor")
    torch.library.register_fake("llama_hf_rev::small_batch_linear", cpu_linear._fake, lib=_REV_LIB)
    linear = "modeling_llama/cpu_linear.py"
    rename = ("TORCH_LIBRARY_IMPL(llama_hf,", "TORCH_LIBRARY_IMPL(llama_hf_rev,")
    kernel = cpu_linear._build_kernel("llama_small_batch_linear_rev", source_at(rev, linear))
    glue_source = source_at(rev, linear, "_NATIVE_SOURCE")
    global REV_PACKED
    REV_PACKED = '"packed_linear"' in glue_source
    if REV_PACKED:  # (the revision's glue implements it too: its schema, for the dispatcher)
        _REV_LIB.define("packed_linear(Tensor x, Tensor packed) -> Tensor")
        torch.library.register_fake("llama_hf_rev::packed_linear", cpu_linear._packed_fake, lib=_REV_LIB)
    glue = cpu_linear._build_glue("llama_hf_ops_rev", glue_source.replace(*rename))
    if None in (kernel, glue):
        raise SystemExit(f"the kernels at {rev!r} did not build")
    k = ctypes.CDLL(str(kernel))
    torch.ops.load_library(str(glue))
    entries = ("llama_small_batch_linear", "llama_small_batch_linear_bf16", "llama_packed_linear_bf16")
    ctypes.CDLL(str(glue)).llama_hf_set_kernels(  # (a revision before the packed entry takes two: the third unread)
        *(
            ctypes.c_void_p(ctypes.cast(getattr(k, e), ctypes.c_void_p).value if hasattr(k, e) else None)
            for e in entries
        )
    )
    attention_op = attention_kernel_at(rev)

    def attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if query.shape[2] == 1:
            return attention_op(query, key, value, attention_mask, scaling), None
        return cpu_attention.eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout)

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    cpu_attention.ALL_ATTENTION_FUNCTIONS.register(REV_ATTENTION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REV_ATTENTION, eager_mask)
    return '"size_asserts": False' in file_at(rev, "modeling_llama/fast_decode.py")


def _rev_op_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        packed = getattr(self, "_fast_packed", None)  # (where the revision has the packed op: its decoder packs)
        if packed is not None:
            return torch.ops.llama_hf_rev.packed_linear(x, packed)
        return torch.ops.llama_hf_rev.small_batch_linear(x, self.weight)
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
    p.add_argument("--against", metavar="REV", help="add a decoder running the CPU kernels of this git revision")
    p.add_argument(
        "--decoders",
        help="comma-separated names of the decoders to build besides `all` (default: every one; e.g. "
        "'unpacked weights' alone for a large preset, whose copies would not all fit in memory)",
    )
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
    names = ["all", "eager attention", "op in Python", "C++ wrapper", "4 KB pages", "unpacked weights"]
    if args.decoders:
        chosen = {n.strip() for n in args.decoders.split(",") if n.strip()}
        if chosen - set(names):
            p.error(f"--decoders: unknown {sorted(chosen - set(names))}; choose from {names[1:]}")
        names = [n for n in names if n == "all" or n in chosen]
    rev = f"kernels at {args.against}" if args.against else None
    if rev:
        rev_without_asserts = kernels_at(args.against)
        names.append(rev)
    models = {name: model if name == "all" else copy.deepcopy(model) for name in names}
    max_length = args.prompt + args.new_tokens + 1
    attn = {"eager attention": "eager", rev: REV_ATTENTION}  # (eager: the step's attention left to inductor)
    decoders = {
        name: FastDecoder(
            m,
            args.batch,
            max_length,
            attn_implementation=attn.get(name),
            cpp_wrapper=name == "C++ wrapper",
            huge_pages=name != "4 KB pages",
            packed_weights=False
            if name in ("unpacked weights", "op in Python") or (name == rev and not REV_PACKED)
            else None,
        )
        for name, m in models.items()
    }
    for module in models["op in Python"].modules() if "op in Python" in models else ():
        if isinstance(module, torch.nn.Linear):
            module.forward = _python_op_forward.__get__(module)
    if rev:
        for module in models[rev].modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = _rev_op_forward.__get__(module)
        if not rev_without_asserts:
            decoders[rev]._compile_kwargs["options"].pop("size_asserts", None)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    tokens = {name: dec.generate(prompt, args.new_tokens + 1) for name, dec in decoders.items()}  # compiles
    # the same kernels in another wrapper or memory: the same tokens. Another attention (in bf16: inductor's math
    # rounds its scores and weights to bf16) or another revision's kernels: reported
    # (and unpacked weights, whose bf16 sums are added in another order)
    reported = {rev} | ({"eager attention"} if decoders["all"].dtype == torch.bfloat16 else set())
    reported |= {"unpacked weights"} if decoders["all"].packed_bytes else set()
    # (the op in Python runs the row kernel: where `all` reads packed weights, its tokens are the unpacked ones', or
    # reported where that decoder is not built)
    like = {"op in Python": "unpacked weights"} if decoders["all"].packed_bytes else {}
    if "unpacked weights" not in decoders and like:
        reported |= {"op in Python"}
        like = {}
    for name in decoders:
        if name not in reported:
            ref = like.get(name, "all")
            assert torch.equal(tokens[name], tokens[ref]), f"{name} gave other tokens than {ref}"
    same = {
        n: round(float((tokens[n] == tokens["all"]).float().mean()), 3)
        for n in sorted((reported - {None}) & set(tokens))
    }

    steps = {name: [] for name in names}
    prefills = {name: [] for name in names}  # (the eager prefill: packed copies where `all` packs, bf16 dot products)
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each decoder first in turn
            dec = decoders[name]
            t = time.perf_counter()
            dec.generate(prompt, 1)
            prefill = time.perf_counter() - t
            prefills[name].append(prefill * 1e3)
            t = time.perf_counter()
            dec.generate(prompt, args.new_tokens + 1)
            steps[name].append((time.perf_counter() - t - prefill) / args.new_tokens * 1e3)
    ratios = {n: statistics.median(x / a for x, a in zip(steps[n], steps["all"])) for n in names}
    pre_ratios = {n: statistics.median(x / a for x, a in zip(prefills[n], prefills["all"])) for n in names}
    result = {
        "meta": run_meta(preset=args.preset, batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                         rounds=args.rounds),
        "op_call_us": {k: [round(v, 2) for v in vs] for k, vs in costs.items()},
        "huge_page_bytes": {n: dec.huge_page_bytes for n, dec in decoders.items()},
        "step_ms": {k: [round(v, 3) for v in vs] for k, vs in steps.items()},
        "step_ms_median": {k: round(statistics.median(v), 3) for k, v in steps.items()},
        "step_over_all_median_of_rounds": {k: round(v, 4) for k, v in ratios.items()},
        "prefill_ms": {k: [round(v, 3) for v in vs] for k, vs in prefills.items()},
        "prefill_ms_median": {k: round(statistics.median(v), 3) for k, v in prefills.items()},
        "prefill_over_all_median_of_rounds": {k: round(v, 4) for k, v in pre_ratios.items()},
        "dtype": str(decoders["all"].dtype),
        "tokens_equal_to_all": same,
    }  # fmt: skip
    md = (
        f"| batch {args.batch}, `{args.preset}`, prompt {args.prompt} + {args.new_tokens} new, {args.rounds} rounds "
        "| steady step, ms (median) | step / `all` (median of rounds) | prefill, ms (median) | prefill / `all` |\n"
        "|---|---|---|---|---|\n"
        + "".join(
            f"| {n} | {result['step_ms_median'][n]:.2f} | {ratios[n]:.3f}x | {result['prefill_ms_median'][n]:.1f} "
            f"| {pre_ratios[n]:.3f}x |\n"
            for n in names
        )
        + f"\nOne call of the product op on a tiny product (best of 3): C++ {min(costs['cpp']):.1f} µs, "
        f"Python {min(costs['python']):.1f} µs.\n"
    )
    md += f"\n({decoders['all'].dtype}.)" + "".join(
        f" `{n}`: its tokens equal `all`'s at {v:.0%} of positions." for n, v in same.items()
    )
    md += "\n"
    stem = "decode_step_parts" + (f"_against_{args.against}" if args.against else "")
    write_results(args.out, stem, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
