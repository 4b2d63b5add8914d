"""Plot a run's training curves: ``python -m training.plot RUN_DIR`` writes RUN_DIR/loss.png and RUN_DIR/lr.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.metrics import read_metrics

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training.pretrain run folder?")
    rows = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    lrs = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if not train:
        raise ValueError(f"{path} holds no loss values")
    outputs = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
    outputs.append(run_dir / "loss.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*zip(*lrs), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{run_dir.name}: learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "lr.png", dpi=120)
    outputs.append(run_dir / "lr.png")
    plt.close(fig)
    return outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.plot", description=__doc__)
    p.add_argument("run_dir", help="a training.pretrain output_dir (with metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        for out in plot_run(args.run_dir):
            print(f"wrote {out}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
