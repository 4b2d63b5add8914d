"""Write a ``torch.save`` checkpoint (a dict of tensors) one tensor at a time.

``torch.save`` needs every tensor in memory. Here the file is first written by ``torch.save`` itself under
``torch.serialization.skip_data`` from fake tensors of the final shapes and dtypes (no memory, holes where the
data goes); each tensor's bytes are then written at its record's offset as it is produced. The result is a
standard zip-format checkpoint that ``torch.load`` (with or without ``mmap``, ``weights_only``) reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["StreamingTorchSave"]


class StreamingTorchSave:
    """Reserve ``path`` for a dict of tensors with the given shapes/dtypes, then fill it tensor by tensor.

    Args:
        path: output ``.pth`` file.
        specs: ``{name: (shape, dtype)}`` in the order the dict should have.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.path = Path(path)
        self.specs = dict(specs)
        with FakeTensorMode():
            skeleton = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in self.specs.items()}
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, self.path)
        reader = torch._C.PyTorchFileReader(str(self.path))
        # torch.save numbers storages "0", "1", ... in the order it pickles them: the dict's order.
        self.offsets = {name: reader.get_record_offset(f"data/{k}") for k, name in enumerate(self.specs)}
        del reader
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path.name}:{name}: reserved {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self.offsets[name])
        self._file.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def finish(self) -> None:
        missing = [n for n in self.specs if n not in self._written]
        self.close()
        if missing:
            raise ValueError(f"{self.path.name}: {len(missing)} tensors were never written, first {missing[0]!r}")
