"""Throughput accounting (FLOPs per token, MFU) and the per-step metrics file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["flops_per_token", "peak_flops_for_device", "MetricsWriter"]

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring.
_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def flops_per_token(n_params: int, n_embedding_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d s`` (PaLM, Appendix B).

    ``N`` excludes the input embedding (a lookup, no matmul) but includes the output projection; ``12 L d s`` is
    the attention score and value matmuls (forward + backward) at sequence length ``s``.
    """
    return 6.0 * (n_params - n_embedding_params) + 12.0 * n_layers * hidden * seq_len


def peak_flops_for_device(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in _PEAKS.items():
        if key in device_name:
            return value
    return None


class MetricsWriter:
    """Append one JSON object per line to ``metrics.jsonl``; on resume, drop lines past the resumed step."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
