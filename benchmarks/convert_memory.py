"""Peak memory of the Meta -> HF converter against checkpoint size, side by side with a naive converter.

For two synthetic checkpoints in Meta's release layout (2 model-parallel shards, fp16), run in a fresh process:

- ``ours``: ``python -m convert.convert_llama_weights_to_hf`` (memory-mapped shards, streamed safetensors);
- ``naive``: what the classic transformers script does: ``torch.load`` every shard into memory, merge the full
  state dict, then ``safetensors.torch.save_file``.

While each runs, /proc/PID/status is sampled every 10 ms for VmRSS (all resident memory, including file pages of
the memory-mapped shards, which the kernel can drop under pressure) and RssAnon (anonymous memory: what must fit
in RAM). Writes benchmarks/results/convert_memory.{json,md}.

    python benchmarks/convert_memory.py            # ~0.3 GB and ~1.3 GB checkpoints
    python benchmarks/convert_memory.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NAIVE = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from convert.keymap import KEYMAP, permute_meta_to_hf
    from pathlib import Path
    src, out, n_heads, n_layers, n_shards = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
    shards = [torch.load(src / f"consolidated.{k:02d}.pth", map_location="cpu", weights_only=True)
              for k in range(n_shards)]
    state = {}
    for spec in KEYMAP:
        for i in range(n_layers) if spec.per_layer else [None]:
            meta = spec.meta.format(i=i)
            parts = [s[meta] for s in shards]
            t = parts[0] if spec.split_dim is None else torch.cat(parts, dim=spec.split_dim)
            if spec.rotary:
                t = permute_meta_to_hf(t, n_heads)
            state[spec.hf.format(i=i)] = t.clone()
    del shards
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    """
)


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; sample its VmRSS / RssAnon peaks from /proc every 10 ms."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)

    t0 = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"peak_rss_bytes": peaks["VmRSS"], "peak_anon_bytes": peaks["RssAnon"], "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small checkpoints (for a smoke run)")
    p.add_argument("--workdir", default=None, help="where to write the synthetic checkpoints (default: a temp dir)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    args = p.parse_args()

    import torch

    from convert.synthetic import write_meta_checkpoint

    tokenizer = REPO / "tests" / "fixtures" / "tokenizer.model"
    # (name, dim, layers, heads): checkpoint sizes grow ~4x between the two
    sizes = [("S", 256, 4, 4), ("M", 512, 8, 8)] if args.quick else [("S", 1024, 8, 8), ("L", 2048, 12, 16)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        for name, dim, layers, heads in sizes:
            root = work / f"meta-{name}"
            write_meta_checkpoint(
                root, name, dim=dim, n_layers=layers, n_heads=heads, n_shards=2, tokenizer_model=tokenizer, seed=0
            )
            ckpt_bytes = sum(f.stat().st_size for f in (root / name).glob("consolidated.*.pth"))
            largest = 32000 * dim * 2  # embedding / output matrix in fp16
            ours = run_measured(
                [
                    sys.executable,
                    "-m",
                    "convert.convert_llama_weights_to_hf",
                    "--input_dir",
                    str(root),
                    "--model_size",
                    name,
                    "--output_dir",
                    str(work / f"hf-{name}"),
                    "--no_progress",
                ],
                env,
            )
            naive = run_measured(
                [
                    sys.executable,
                    "-c",
                    NAIVE,
                    str(root / name),
                    str(work / f"naive-{name}"),
                    str(heads),
                    str(layers),
                    "2",
                ],
                env,
            )
            # the same imports without the work: what the anonymous memory is measured above
            imports_ours = run_measured(
                [
                    sys.executable,
                    "-c",
                    "import convert.convert_llama_weights_to_hf, modeling_llama, sentencepiece, tokenizers",
                ],
                env,
            )
            imports_naive = run_measured([sys.executable, "-c", "import torch, safetensors.torch, convert.keymap"], env)
            rows.append(
                {
                    "checkpoint": name,
                    "dim": dim,
                    "layers": layers,
                    "checkpoint_bytes": ckpt_bytes,
                    "largest_tensor_bytes": largest,
                    "ours": ours,
                    "naive": naive,
                    "imports_ours": imports_ours,
                    "imports_naive": imports_naive,
                }
            )
            shutil.rmtree(root)
            shutil.rmtree(work / f"hf-{name}")
            shutil.rmtree(work / f"naive-{name}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"convert_memory{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    def gb(x: float) -> str:
        return f"{x / 1e9:.2f} GB"

    lines = [
        f"Converter memory ({meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}).",
        "Anonymous memory: peak RssAnon minus the peak of a process doing the same imports and nothing else.",
        "Peak RSS also counts the memory-mapped input pages (file-backed, reclaimable).",
        "",
        "| checkpoint | size on disk | largest tensor | ours: anon above imports | ours: peak RSS | ours: time "
        "| naive: anon above imports | naive: peak RSS | naive: time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base, nbase = r["imports_ours"]["peak_anon_bytes"], r["imports_naive"]["peak_anon_bytes"]
        lines.append(
            f"| {r['checkpoint']} (d={r['dim']}, L={r['layers']}, 2 shards) | {gb(r['checkpoint_bytes'])} "
            f"| {gb(r['largest_tensor_bytes'])} | {gb(r['ours']['peak_anon_bytes'] - base)} "
            f"| {gb(r['ours']['peak_rss_bytes'])} | {r['ours']['seconds']:.1f} s "
            f"| {gb(r['naive']['peak_anon_bytes'] - nbase)} | {gb(r['naive']['peak_rss_bytes'])} "
            f"| {r['naive']['seconds']:.1f} s |"
        )
    (out / f"convert_memory{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
