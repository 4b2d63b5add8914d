"""Peak memory and step time of the three activation-checkpointing modes (none, full, selective).

Each mode trains the same model on the same batch for a few steps in a fresh process (so peak memory is the
process's own): forward + backward + AdamW. On CPU the peak is the process's high-water RSS (VmHWM) above a
process that only built the model and optimizer; on CUDA it is ``torch.cuda.max_memory_allocated``. Writes
benchmarks/results/activation_checkpointing.{json,md}.

    python benchmarks/activation_checkpointing.py [--preset small] [--seq 1024] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from modeling_llama import LlamaConfig, LlamaForCausalLM
from training.parallel import apply_activation_checkpointing
mode, preset, seq, batch, steps = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
layers, vocab = int(sys.argv[7]), int(sys.argv[8])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
cfg = LlamaConfig.from_preset(preset, max_position_embeddings=max(2048, seq), num_hidden_layers=layers,
                               vocab_size=vocab)
model = LlamaForCausalLM(cfg).to(device).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
base = hwm()
if mode != "build-only":
    apply_activation_checkpointing(model, mode)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
else:
    times = [0.0]
peak = torch.cuda.max_memory_allocated() if device == "cuda" else hwm()
timed = sorted(times[1:] or times)
print(json.dumps({"mode": mode, "peak_bytes": peak, "base_bytes": base, "step_s": timed[len(timed) // 2],
                  "device": device}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=12, help="decoder layers (activations grow with them)")
    p.add_argument("--vocab_size", type=int, default=4096, help="a small vocabulary keeps the logits from dominating")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    rows = []
    for mode in ("build-only", "none", "full", "selective"):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                WORKER,
                str(REPO),
                mode,
                args.preset,
                str(args.seq),
                str(args.batch),
                str(args.steps),
                str(args.layers),
                str(args.vocab_size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_bytes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "preset": args.preset,
        "layers": args.layers,
        "vocab_size": args.vocab_size,
        "seq": args.seq,
        "batch": args.batch,
        "device": rows[0]["device"],
    }
    (out / "activation_checkpointing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    none = next(r for r in rows if r["mode"] == "none")
    lines = [
        f"Activation checkpointing ({meta['date']}, {meta['device']}, {meta['cpus']} CPUs, preset "
        f"{args.preset} with {args.layers} layers and a {args.vocab_size}-token vocabulary, batch {args.batch} x "
        f"seq {args.seq}, fp32); memory above model + optimizer",
        "",
        "| mode | activation memory | vs none | step time | vs none |",
        "|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        mem = r["peak_bytes"] - base
        lines.append(
            f"| {r['mode']} | {mem / 2**30:.2f} GiB | {mem / (none['peak_bytes'] - base):.2f}x | "
            f"{r['step_s']:.2f} s | {r['step_s'] / none['step_s']:.2f}x |"
        )
    (out / "activation_checkpointing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
