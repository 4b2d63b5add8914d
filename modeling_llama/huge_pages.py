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
allocation; :func:`empty` does it for one buffer (a mapping of its own, unmapped when freed), whatever the
environment, and :func:`move_parameters` puts parameters into such a buffer (one buffer for all, so no page is left
mostly empty).

Huge pages at first touch are the kernel's best effort: where memory is fragmented and THP's ``defrag`` setting
forbids compaction at fault time, a marked buffer still gets 4 KB pages (seen on a CI machine). So
:func:`move_parameters` then asks the kernel to collapse the buffer into huge pages at once
(``madvise(MADV_COLLAPSE)``, Linux 6.1+, which compacts whatever ``defrag`` says): ~1 ms where the pages are already
huge, ~0.7 s for 400 MB that are not (2-core VM). :func:`advised` and :func:`huge_page_bytes` read back what the
kernel did.

Nothing here changes a value: the parameters keep their dtype, shape and contents, and stay ``Parameter`` objects
(only their ``.data`` moves). Where huge pages are not available (not Linux, THP ``never`` for 2-MB pages, THP
disabled for the process) :func:`available` is false and :func:`move_parameters` leaves the parameters where they
are.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import warnings

import torch

__all__ = ["PAGE_BYTES", "ENV_VAR", "available", "empty", "move_parameters", "huge_page_bytes", "advised", "collapse"]

PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KB base pages) transparent huge page size
ENV_VAR = "LLAMA_HUGE_PAGES"  # 0: never move anything to huge pages
_MADV_COLLAPSE = 25  # Linux 6.1+: collapse a range into huge pages now, compacting memory if it must
_PR_GET_THP_DISABLE = 42  # <linux/prctl.h>
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_THP_PMD_ENABLED = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled"


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _bracketed(path: str) -> str:
    """The selected word of a sysfs choice file ("always [madvise] never" -> "madvise"), "" where unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def thp_mode() -> str:
    """The system's transparent huge page mode for 2-MB pages (``always``, ``madvise``, ``never``), ``""`` where
    unknown. Since Linux 6.8 the 2-MB size has its own setting (``hugepages-2048kB/enabled``), which wins over the
    global one unless it is ``inherit``."""
    per_size = _bracketed(_THP_PMD_ENABLED)
    return per_size if per_size and per_size != "inherit" else _bracketed(_THP_ENABLED)


def _thp_disabled_for_process() -> bool:
    """Whether this process was told never to use huge pages (``prctl(PR_SET_THP_DISABLE)``, which some container
    runtimes and service managers set and children inherit)."""
    try:
        return _libc().prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1
    except (AttributeError, OSError):
        return False


def available() -> bool:
    """Whether :func:`empty` can ask for huge pages here: Linux with THP ``always`` or ``madvise`` for 2-MB pages,
    not disabled for this process, and ``LLAMA_HUGE_PAGES`` not ``0``."""
    return (
        sys.platform.startswith("linux")
        and os.environ.get(ENV_VAR, "1") != "0"
        and thp_mode() in ("always", "madvise")
        and not _thp_disabled_for_process()
    )


def empty(nbytes: int) -> torch.Tensor:
    """A new uint8 CPU tensor of ``nbytes``, starting on a 2-MB boundary, whose pages the kernel backs with huge
    pages as they are first written (``madvise(MADV_HUGEPAGE)`` before any touch). The memory is a mapping of its
    own (an anonymous ``mmap``), so the advice covers nothing else and the mapping goes back to the system when the
    last view of the tensor is freed (memory from ``malloc``'s heap would keep the advice after it is reused for
    other allocations). Where :func:`available` is false, or the system refuses the mapping (an address-space
    limit, a sandbox; with a warning), a plain tensor (4 KB pages); the contents are uninitialised either way."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    buf = _mapped(nbytes) if available() and nbytes > 0 else None
    return torch.empty(nbytes, dtype=torch.uint8) if buf is None else buf


def _mapped(nbytes: int) -> torch.Tensor | None:
    """:func:`empty`'s buffer, or None (with a warning) where the system refuses the mapping or the advice."""
    length = -(-nbytes // PAGE_BYTES) * PAGE_BYTES  # whole huge pages
    # private (a shared anonymous mapping is shmem, whose huge pages follow shmem_enabled); room to start on a
    # 2-MB boundary (the untouched rest costs no memory)
    try:
        region = mmap.mmap(-1, length + PAGE_BYTES, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    except OSError as e:
        return _refused(f"could not map {length + PAGE_BYTES} bytes for a huge-page buffer", e)
    with warnings.catch_warnings():  # (torch warns that the buffer is not owned by it: the tensor holds it alive)
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.frombuffer(region, dtype=torch.uint8)
    offset = -whole.data_ptr() % PAGE_BYTES
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, length)
    except OSError as e:  # (a kernel built without THP, a seccomp filter): the buffer would get 4 KB pages
        return _refused("madvise(MADV_HUGEPAGE) was refused", e)
    return whole[offset : offset + nbytes]  # (a view: the mapping lives as long as any view of it)


def _refused(what: str, error: OSError) -> None:
    """Warn (at the caller of :func:`empty` / :func:`move_parameters`) that ordinary memory is used instead."""
    warnings.warn(
        f"huge_pages: {what} ({error}); using ordinary memory (4 KB pages) instead. Set {ENV_VAR}=0 to skip the "
        "attempt.",
        RuntimeWarning,
        stacklevel=4,
    )


def _madvise(address: int, length: int, advice: int) -> bool:
    return _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def collapse(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back the whole 2-MB pages inside ``tensor``'s memory with huge pages now
    (``madvise(MADV_COLLAPSE)``, Linux 6.1+), compacting memory if it must, whatever THP's ``defrag`` setting: for
    memory that got 4 KB pages when it was first written because no free 2-MB block was at hand. Values are kept.
    A 2-MB page cannot straddle two memory mappings: where the tensor's memory spans several (malloc's heap can be
    split), the pages across a boundary stay small even when the kernel reports success (:func:`empty`'s buffers
    are one mapping each).
    Returns whether the kernel did it (False on older kernels, where memory cannot be found, or where
    :func:`available` is false)."""
    if not available() or tensor.device.type != "cpu":
        return False
    start = -(-tensor.data_ptr() // PAGE_BYTES) * PAGE_BYTES
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // PAGE_BYTES * PAGE_BYTES
    return end > start and _madvise(start, end - start, _MADV_COLLAPSE)


def move_parameters(params) -> int:
    """Move each parameter's data into one buffer from :func:`empty` (each 64-byte aligned, same dtype, shape and
    values; a parameter listed twice, e.g. tied, moves once). One parameter at a time, so the old copy of each is
    freed as the next is moved. Returns the bytes moved; 0 (and nothing moved) where :func:`available` is false,
    a parameter is not a contiguous CPU tensor, or the system refuses the buffer's mapping (with a warning)."""
    unique = list({id(p): p for p in params}.values())
    if not unique or not available():
        return 0
    if any(p.device.type != "cpu" or not p.is_contiguous() for p in unique):
        return 0
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in unique]
    total = sum(sizes)
    arena = _mapped(total) if total else None
    if arena is None:
        return 0
    offset = 0
    with torch.no_grad():
        for p, size in zip(unique, sizes):
            nbytes = p.numel() * p.element_size()
            view = arena[offset : offset + nbytes].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += size
    # Pages written above got huge pages as far as the kernel had free 2-MB blocks; have it collapse the rest now
    # (best effort: the weights are read every step for the model's lifetime, so a one-off compaction pays).
    collapse(arena)
    return offset


def _smaps_entries(start: int, end: int) -> list[dict[str, str]]:
    """The ``/proc/self/smaps`` fields (name -> rest of the line, plus ``range``) of every memory mapping that
    overlaps the bytes ``[start, end)``; empty where there is none or smaps cannot be read (not Linux)."""
    entries: list[dict[str, str]] = []
    try:
        current = None
        for line in _read_smaps().decode("ascii", errors="replace").splitlines():
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = {"range": head} if lo < end and start < hi else None
                if current is not None:
                    entries.append(current)
            elif current is not None:
                current[head.rstrip(":")] = rest.strip()
    except (OSError, ValueError):
        return []
    return entries


def _read_smaps() -> bytes:
    """``/proc/self/smaps`` in as few reads as possible: the kernel writes one read's worth under one hold of the
    process's memory-map lock, so a single large read is a consistent picture while other threads map and unmap
    memory (read in small pieces, a mapping that grows between two pieces can be left out)."""
    fd = os.open("/proc/self/smaps", os.O_RDONLY)
    try:
        parts = []
        while chunk := os.read(fd, 16 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _smaps_entry(address: int) -> dict[str, str]:
    """The smaps fields of the mapping that holds ``address`` (empty where none)."""
    found = _smaps_entries(address, address + 1)
    return found[0] if found else {}


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of huge pages (``AnonHugePages``) the kernel has put in the memory mappings that hold ``tensor``'s bytes
    (whole mappings: they may hold more than the tensor), from ``/proc/self/smaps``; 0 where none or unknown (not
    Linux). Huge pages are best effort: a buffer from :func:`empty` gets them as far as the kernel has free 2-MB
    blocks when it is first written (and ``khugepaged`` may merge more later), so this can be anywhere from 0 to
    the buffer's size."""
    start = tensor.data_ptr()
    end = start + max(1, tensor.numel() * tensor.element_size())
    total = 0
    for fields in _smaps_entries(start, end):
        value = fields.get("AnonHugePages", "0 kB").split()
        total += int(value[0]) * 1024 if value and value[0].isdigit() else 0
    return total


def advised(tensor: torch.Tensor) -> bool:
    """Whether the memory mapping that holds ``tensor``'s first byte is marked ``MADV_HUGEPAGE`` (the ``hg`` flag
    in ``/proc/self/smaps``' ``VmFlags``), as :func:`empty` marks its buffers; False where unknown."""
    return "hg" in _smaps_entry(tensor.data_ptr()).get("VmFlags", "").split()
