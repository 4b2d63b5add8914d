"""Training checkpoints: atomic, rotated, resumable exactly; and Hugging Face export from any of them.

Layout: ``RUN/checkpoints/checkpoint-00000100/``. Every rank writes into ``.tmp-checkpoint-00000100`` and the
main process renames it once all ranks are done, so a checkpoint is visible only when complete: a kill during a
save leaves the previous checkpoints as they were. The last ``save_total_limit`` checkpoints are kept.

What is saved depends on how the model is parallelised:

- Accelerate (single process, DDP, DeepSpeed ZeRO-3): ``accelerator.save_state`` (model, optimizer, RNG of every
  rank; DeepSpeed writes its sharded ZeRO files);
- FSDP2 (``training.parallel.apply_fsdp2``): ``torch.distributed.checkpoint`` of the sharded model and optimizer
  state (no gather), plus each rank's RNG state;

and in both cases ``extra_state.pt`` (scheduler, data position, step and token counters) from the main process.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "load_hf_state_dict_from_checkpoint", "CheckpointError"]

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(Exception):
    pass


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Names, atomic publication and rotation of ``RUN/checkpoints/checkpoint-N`` folders."""

    def __init__(self, run_dir: str | Path, keep: int | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"checkpoint-{step:08d}"

    def tmp_path(self, step: int) -> Path:
        return self.root / f".tmp-checkpoint-{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / "extra_state.pt").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, resume_from: str) -> Path:
        """``latest`` or a path -> a complete checkpoint folder (error with what was found otherwise)."""
        if resume_from == "latest":
            latest = self.latest()
            if latest is None:
                raise CheckpointError(f"resume_from_checkpoint=latest but {self.root} holds no complete checkpoint")
            return latest
        path = Path(resume_from)
        if not (path / "extra_state.pt").is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no extra_state.pt)")
        return path

    def prepare(self, step: int) -> Path:
        """(main process) make an empty temporary folder for ``step`` and clear stale ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir()
        return tmp

    def publish(self, step: int) -> Path:
        """(main process, after every rank finished writing) rename into place and rotate."""
        final = self.path(step)
        if final.exists():
            shutil.rmtree(final)
        self.tmp_path(step).rename(final)
        if self.keep is not None and self.keep > 0:
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def load_hf_state_dict_from_checkpoint(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (HF names) of any checkpoint this trainer writes, in one process.

    Handles accelerate's ``model.safetensors``, DeepSpeed ZeRO shards (merged with DeepSpeed's zero_to_fp32) and
    FSDP2 ``torch.distributed.checkpoint`` folders.
    """
    ckpt = Path(ckpt)
    info = json.loads((ckpt / "checkpoint_info.json").read_text()) if (ckpt / "checkpoint_info.json").is_file() else {}
    kind = info.get("kind")
    if kind == "fsdp2" or (ckpt / "dcp" / ".metadata").is_file():
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            flat = _load_state_dict_from_keys(checkpoint_id=str(ckpt / "dcp"))
        model = flat.get("model", flat)
        if not isinstance(model, dict):
            raise CheckpointError(f"{ckpt}: unexpected DCP layout")
        return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    if kind == "deepspeed" or list(ckpt.glob("*/zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sub = next((p for p in ckpt.iterdir() if p.is_dir() and list(p.glob("zero_pp_rank_*"))), None)
        if sub is None:
            raise CheckpointError(f"{ckpt}: no DeepSpeed ZeRO shards found")
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=sub.name)
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = ckpt / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{ckpt}: no model weights found (not a checkpoint of training.pretrain?)")
