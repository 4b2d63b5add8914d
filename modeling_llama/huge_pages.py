"""Tensors on transparent huge pages (Linux), for weights that a decoding step streams from memory.

A CPU decoding step reads every weight once per token. With the 4 KB pages a process gets by default, reading
438 MB of weights (the ``100M`` preset in fp32) crosses ~107,000 pages a step; each first touch of a page needs a
TLB entry, and in a virtual machine a TLB miss walks two levels of page tables. On 2-MB pages the same weights
span ~210 pages. Measured on a 2-core AVX2 VM (``benchmarks/RESULTS.md``): a read-only pass over them 0.77-0.82x
the time, ``cpu_linear``'s 8-row products 0.85-0.92x; ``FastDecoder``'s whole batch-8 step 0.95x in the longest
side-by-side run, 0.98x as the median of shorter ones (the rest of the step and the machine's noise dilute it).

Linux gives a process huge pages for anonymous memory it has marked with ``madvise(MADV_HUGEPAGE)`` before the
memory is first touched, when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise`` (the
usual default). torch's CPU allocator does that only when ``THP_MEM_ALLOC_ENABLE=1`` is set before torch's first
allocation; :func:`empty` does it for one buffer, whatever the environment, and :func:`move_parameters` puts
parameters into such a buffer (one buffer for all, so no page is left mostly empty).

Nothing here changes a value: the parameters keep their dtype, shape and contents, and stay ``Parameter`` objects
(only their ``.data`` moves). Where huge pages are not available (not Linux, THP ``never``, ``madvise`` refused)
:func:`available` is false and :func:`move_parameters` leaves the parameters where they are.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

__all__ = ["PAGE_BYTES", "ENV_VAR", "available", "empty", "move_parameters", "huge_page_bytes"]

PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KB base pages) transparent huge page size
ENV_VAR = "LLAMA_HUGE_PAGES"  # 0: never move anything to huge pages
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def thp_mode() -> str:
    """The system's transparent huge page mode (``always``, ``madvise``, ``never``), ``""`` where unknown."""
    try:
        with open(_THP_ENABLED, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def available() -> bool:
    """Whether :func:`empty` can ask for huge pages here: Linux with THP ``always`` or ``madvise``, and
    ``LLAMA_HUGE_PAGES`` not ``0``."""
    return (
        sys.platform.startswith("linux") and os.environ.get(ENV_VAR, "1") != "0" and thp_mode() in ("always", "madvise")
    )


def empty(nbytes: int) -> torch.Tensor:
    """A new uint8 CPU tensor of ``nbytes``, starting on a 2-MB boundary, whose pages the kernel backs with huge
    pages as they are first written (``madvise(MADV_HUGEPAGE)`` before any touch). Where :func:`available` is false
    or ``madvise`` fails, a plain tensor (4 KB pages); the contents are uninitialised either way."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    length = -(-nbytes // PAGE_BYTES) * PAGE_BYTES  # whole huge pages
    buf = torch.empty(length + PAGE_BYTES, dtype=torch.uint8)  # room to start on a 2-MB boundary
    offset = -buf.data_ptr() % PAGE_BYTES
    if length:
        _libc().madvise(ctypes.c_void_p(buf.data_ptr() + offset), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    return buf[offset : offset + nbytes]  # (a view: the buffer lives as long as any view of it)


def move_parameters(params) -> int:
    """Move each parameter's data into one buffer from :func:`empty` (each 64-byte aligned, same dtype, shape and
    values; a parameter listed twice, e.g. tied, moves once). One parameter at a time, so the old copy of each is
    freed as the next is moved. Returns the bytes moved; 0 (and nothing moved) where :func:`available` is false
    or a parameter is not a contiguous CPU tensor."""
    unique = list({id(p): p for p in params}.values())
    if not unique or not available():
        return 0
    if any(p.device.type != "cpu" or not p.is_contiguous() for p in unique):
        return 0
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in unique]
    arena = empty(sum(sizes))
    offset = 0
    with torch.no_grad():
        for p, size in zip(unique, sizes):
            nbytes = p.numel() * p.element_size()
            view = arena[offset : offset + nbytes].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += size
    return offset


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of huge pages (``AnonHugePages``) in the memory mapping that holds ``tensor``'s first byte, from
    ``/proc/self/smaps``; 0 where none or unknown (not Linux)."""
    address = tensor.data_ptr()
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start <= address < end
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0
