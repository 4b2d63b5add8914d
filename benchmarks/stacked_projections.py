"""An experiment, not adopted: FastDecoder's CPU step with each attention's q/k/v and each MLP's gate/up computed as
ONE product of their weights stacked (49 kernel calls a step instead of 85 for the 100M preset), against the step
as it is, side by side in one process, rounds alternating (benchmarks/RESULTS.md, "Stacked projections").

The stacking is a prototype patched onto a FastDecoder from outside: the weights already lie back to back in the
huge-page buffer (module order), so the stacked weight is a view of them; the lead linear (q_proj, gate_proj)
computes the stacked product while compiling and hands its other parts to the next linears called with the same
input tensor. The script checks the kernel-call count of each decoder and that both give the same tokens.

    python benchmarks/stacked_projections.py [--batch 8] [--rounds 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import modeling_llama as ml
from modeling_llama import fast_decode as fd

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
OP = "llama_hf::small_batch_linear"


class Group:
    """Linears that read the same input: their stacked weight, their output sizes, and the parts not yet handed out."""

    def __init__(self, weight: torch.Tensor, sizes: list[int]):
        self.weight, self.sizes, self.pending = weight, sizes, None


def stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """(sum N, K): a view of weights that lie back to back in one storage, else None."""
    first = weights[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for w in weights:
        same = w.untyped_storage().data_ptr() == storage.data_ptr() and w.storage_offset() == offset
        if not same or w.shape[1] != first.shape[1] or w.dtype != first.dtype:
            return None
        offset += w.numel()
    rows, k = sum(w.shape[0] for w in weights), first.shape[1]
    return torch.empty(0, dtype=first.dtype).set_(storage, first.storage_offset(), (rows, k), (k, 1))


def lead_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group = self._stack_group
    if torch.compiler.is_compiling():
        parts = torch.ops.llama_hf.small_batch_linear(x, group.weight).split(group.sizes, -1)
        group.pending = (x, parts[1:])
        return parts[0]
    return fd._eager_linear(self, x)


def member_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group = self._stack_group
    if torch.compiler.is_compiling() and group.pending is not None and group.pending[0] is x:
        out = group.pending[1][self._stack_index]
        if self._stack_index == len(group.pending[1]) - 1:
            group.pending = None
        return out
    return fd._streaming_linear_forward(self, x)


def stack(model: nn.Module) -> int:
    """Patch every q/k/v and gate/up group whose weights lie back to back; the number of groups patched."""
    n = 0
    for module in model.modules():
        for names in GROUPS:
            linears = [getattr(module, name, None) for name in names]
            if not all(isinstance(lin, nn.Linear) and lin.bias is None for lin in linears):
                continue
            weight = stacked_view([lin.weight for lin in linears])
            if weight is None:
                continue
            group = Group(weight, [lin.out_features for lin in linears])
            for i, lin in enumerate(linears):
                lin._stack_group = group
                if i == 0:
                    lin.forward = lead_forward.__get__(lin)
                else:
                    lin._stack_index = i - 1
                    lin.forward = member_forward.__get__(lin)
            n += 1
    return n


def op_calls(dec: fd.FastDecoder, prompt: torch.Tensor, new: int) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dec.generate(prompt, new)
    return sum(e.count for e in prof.key_averages() if e.key == OP)


def steps_seconds(dec: fd.FastDecoder, prompt: torch.Tensor, new: int) -> float:
    """Time of the new - 1 steps after the prefill: a whole generate minus a one-token one (prefill only)."""
    t0 = time.perf_counter()
    dec.generate(prompt, 1)
    t1 = time.perf_counter()
    dec.generate(prompt, new)
    t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--preset", default="100M")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = ml.LlamaForCausalLM(ml.LlamaConfig.from_preset(args.preset)).eval()
    prompt = torch.randint(3, base.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator())
    max_length = args.prompt + args.new_tokens
    shape = f"batch {args.batch}, prompt {args.prompt} + {args.new_tokens} new"
    print(f"{args.preset}, fp32, {shape}, torch {torch.__version__}")
    plain = fd.FastDecoder(copy.deepcopy(base), args.batch, max_length, dtype=torch.float32)
    stacked = fd.FastDecoder(copy.deepcopy(base), args.batch, max_length, dtype=torch.float32)
    print("groups stacked:", stack(stacked.model))
    same = torch.equal(plain.generate(prompt, args.new_tokens), stacked.generate(prompt, args.new_tokens))  # compiles
    print("tokens equal:", same)
    calls = op_calls(plain, prompt, 3), op_calls(stacked, prompt, 3)
    print("kernel calls for 3 tokens (2 steps), plain / stacked:", *calls)
    times: dict[str, list[float]] = {"plain": [], "stacked": []}
    decoders = {"plain": plain, "stacked": stacked}
    for r in range(args.rounds):
        order = ("plain", "stacked") if r % 2 == 0 else ("stacked", "plain")
        for name in order:
            times[name].append(steps_seconds(decoders[name], prompt, args.new_tokens))
        a, b = (times[k][-1] * 1000 / (args.new_tokens - 1) for k in ("plain", "stacked"))
        print(f"round {r}: plain {a:.1f} ms/step, stacked {b:.1f} ms/step, ratio {b / a:.3f}", flush=True)
    ratios = [s / q for q, s in zip(times["plain"], times["stacked"])]
    ms = {k: statistics.median(v) * 1000 / (args.new_tokens - 1) for k, v in times.items()}
    print(f"median step ms: plain {ms['plain']:.1f}, stacked {ms['stacked']:.1f}")
    print(f"median of per-round ratios, stacked / plain time: {statistics.median(ratios):.3f}")
    print(f"rounds faster stacked: {sum(r < 1 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
