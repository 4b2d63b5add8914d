"""Finetuning throughput: padded batches vs packing (position_ids, no cross-attention) vs length-grouped batches.

Same model, same examples (the instruction set of training/data plus longer synthetic ones, so lengths vary as
in real SFT data), same number of examples per optimizer step; measured side by side in one process. Reports
real (non-padding) tokens per second of forward + backward + AdamW step. Writes benchmarks/results/
finetune_packing.{json,md}.

    python benchmarks/finetune_packing.py [--preset small] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import torch
    from transformers import DataCollatorWithFlattening

    from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
    from training.instruct_data import TEMPLATES, SFTCollator, generate_instructions, tokenize_example

    torch.manual_seed(0)
    tok = LlamaTokenizerFast(vocab_file=str(REPO / "tests" / "fixtures" / "tokenizer.model"))
    rng = random.Random(0)
    records = generate_instructions(400, seed=0)
    for r in records[::4]:  # a quarter of long answers: real SFT data has a long tail of lengths
        r["output"] = " ".join([r["output"]] * rng.randint(5, 25))
    examples = [tokenize_example(tok, *TEMPLATES["alpaca"].format(r), 1024) for r in records]
    rng.shuffle(examples)
    model = LlamaForCausalLM(LlamaConfig.from_preset(args.preset, vocab_size=len(tok))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    n = args.steps * args.batch
    pool = examples[:n]
    padded = SFTCollator(tok.pad_token_id)
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    batches = {
        "padded (random order)": [padded(pool[i : i + args.batch]) for i in range(0, n, args.batch)],
        "packed (position_ids)": [flat(pool[i : i + args.batch]) for i in range(0, n, args.batch)],
    }
    by_len = sorted(pool, key=lambda e: len(e["input_ids"]))
    batches["length-grouped + padded"] = [padded(by_len[i : i + args.batch]) for i in range(0, n, args.batch)]
    real_tokens = sum(len(e["input_ids"]) for e in pool)

    def run(name: str) -> dict:
        for b in batches[name][:2]:  # warm-up
            model(**b).loss.backward()
            opt.zero_grad()
        t0 = time.perf_counter()
        computed = 0
        for b in batches[name]:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
            computed += b["input_ids"].numel()
        dt = time.perf_counter() - t0
        return {
            "seconds": dt,
            "real_tokens_per_s": real_tokens / dt,
            "computed_tokens": computed,
            "padding_fraction": 1 - real_tokens / computed,
        }

    results = {name: run(name) for name in batches}
    base = results["padded (random order)"]["real_tokens_per_s"]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "preset": args.preset,
        "steps": args.steps,
        "batch": args.batch,
        "examples": n,
        "real_tokens": real_tokens,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_packing.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        f"Finetuning throughput ({meta['date']}, {meta['cpus']} CPUs, torch {meta['torch']}, preset "
        f"{args.preset}, {n} examples, {args.batch} per step, {real_tokens:,} real tokens)",
        "",
        "| batching | real tokens/s | speed-up | padding computed |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / base:.2f}x | "
            f"{r['padding_fraction']:.0%} |"
        )
    (out / "finetune_packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
