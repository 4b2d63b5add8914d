"""Write sharded safetensors one tensor at a time, with a header planned from shapes known in advance.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A converter knows all names,
shapes and dtypes before it reads any weight (from params.json), so it can write each file's header first and
then stream the tensors in order: memory holds one tensor, not one shard. The files are standard safetensors
(8-byte little-endian header length, JSON header padded to 8 bytes, contiguous little-endian data) with the
``model.safetensors.index.json`` that transformers reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["TensorSpec", "ShardedSafetensorsWriter", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Stream tensors, in the planned order, into ``model-0000k-of-0000n.safetensors`` files plus an index.

    Args:
        folder: output folder.
        plan: every tensor to be written, in writing order.
        max_shard_size: bytes per file (a single larger tensor gets a file of its own).
        metadata: ``__metadata__`` of each file (transformers expects ``{"format": "pt"}``).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        plan: list[TensorSpec],
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = metadata or {"format": "pt"}
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in plan:
            if shards[-1] and size + spec.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self.shards = shards
        self._position = 0  # index into plan of the next tensor to write
        self._shard = -1
        self._in_shard = 0
        self._handle = None
        self.total_size = sum(s.nbytes for s in plan)

    def _open_next(self) -> None:
        self._close()
        self._shard += 1
        self._in_shard = 0
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.shards[self._shard]:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.folder / self.files[self._shard], "wb")  # noqa: SIM115 - closed in _close
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; its name, shape and dtype must match the plan."""
        if self._position >= len(self.plan):
            raise ValueError(f"tensor {name!r} is not in the plan (all {len(self.plan)} tensors already written)")
        spec = self.plan[self._position]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        if self._handle is None or self._in_shard == len(self.shards[self._shard]):
            self._open_next()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._in_shard += 1
        self._position += 1

    def finish(self) -> list[str]:
        """Close the last file and write the index (when there are several files); return the file names."""
        if self._position != len(self.plan):
            missing = [s.name for s in self.plan[self._position :]]
            raise ValueError(f"{len(missing)} planned tensors were not written, first {missing[0]!r}")
        self._close()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {spec.name: self.files[k] for k, shard in enumerate(self.shards) for spec in shard},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def close(self) -> None:
        self._close()
