"""Shared pieces of the converters: errors, safe checkpoint loading, atomic output folders, sizes, checksums."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = [
    "ConversionError",
    "atomic_output_dir",
    "load_checkpoint",
    "parse_size",
    "verify_checklist",
    "DTYPES",
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConversionError(Exception):
    """A problem with the input or output of a conversion; the message names the file and what is wrong."""


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in transformers), ``"2GiB"`` -> 2 * 2**30, ints unchanged."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    unit = next((u for u in units if text.endswith(u)), "")
    number, factor = (text[: -len(unit)].strip(), units[unit]) if unit else (text, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ConversionError(f"cannot read size {size!r}; use e.g. 5GB, 500MB or a number of bytes") from None
    if value <= 0:
        raise ConversionError(f"size {size!r} must be positive")
    return value


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load`` a ``.pth`` as a dict of tensors without executing code and without reading it into RAM.

    Weights-only unpickling refuses anything but tensors and plain containers, so a checkpoint crafted to run code
    is rejected. Tensors are memory-mapped from the file (file-backed pages the kernel can drop), so loading an
    8-shard 65B checkpoint costs no anonymous memory until tensors are copied out.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with path.open("rb") as f:
            head = f.read(1)
        if head != b"\x80":  # neither the zip format (torch >= 1.6) nor a legacy pickle stream
            raise ConversionError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                "no zip directory and no pickle header"
            )
        warnings.warn(
            f"{path} uses the legacy (pre-zip) torch format and cannot be memory-mapped; it is read into memory.",
            stacklevel=2,
        )
    try:
        state = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Unsupported global" in message or "GLOBAL" in message:
            detail = next((ln.strip() for ln in message.splitlines() if "Unsupported global" in ln), "")
            raise ConversionError(
                f"{path}: refusing to load: it holds pickled objects other than tensors, which could run code "
                f"(weights-only loading rejected {detail or 'it'})"
            ) from None
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{message.strip().splitlines()[-1] if message.strip() else e!r}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def verify_checklist(folder: Path) -> int:
    """Check the md5 sums listed in ``folder/checklist.chk`` (Meta's release); return the number checked."""
    checklist = folder / "checklist.chk"
    if not checklist.is_file():
        raise ConversionError(f"{checklist}: not found, so --verify has nothing to check against")
    entries = []
    for lineno, line in enumerate(checklist.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise ConversionError(f"{checklist}:{lineno}: expected '<md5> <file name>', got {line!r}")
        entries.append((parts[0].lower(), parts[1]))
    total = sum((folder / name).stat().st_size for _, name in entries if (folder / name).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying md5", file=sys.stderr) as bar:
        for expected, name in entries:
            path = folder / name
            if not path.is_file():
                raise ConversionError(f"{path}: listed in checklist.chk but missing")
            md5 = hashlib.md5()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    md5.update(block)
                    bar.update(len(block))
            if md5.hexdigest() != expected:
                raise ConversionError(f"{path}: md5 {md5.hexdigest()} does not match checklist.chk ({expected})")
    return len(entries)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``output_dir`` and move it into place only if the body succeeds.

    On any error (disk full included) or interruption the temporary folder is removed and an existing
    ``output_dir`` is left untouched. A non-empty ``output_dir`` is refused unless ``overwrite``.
    """
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: folder is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise ConversionError(f"{out}: could not write the output ({e.strerror}); partial output removed") from e
        raise
