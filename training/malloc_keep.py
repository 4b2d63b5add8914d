"""Keep the memory a CPU training step frees for the next step, instead of faulting it in afresh every step.

glibc's ``malloc`` serves every request of 32 MB or more (its largest ``mmap`` threshold on 64-bit Linux) with a
``mmap`` of its own and gives it back to the kernel with ``munmap`` on ``free``. A CPU training step allocates and
frees the same large buffers every step: activations and their gradients, the fused loss's chunk of logits (128
MB), the embedding's and the LM head's weight gradients (98 MB each at the ``100M`` preset, freed by
``zero_grad(set_to_none=True)``). Each new mapping is faulted in again page by page (4 KB pages: ~69,000-75,000
minor page faults per step of the ``100M`` preset at seq 512, batch 4, measured), and the kernel zeroes every page
before the step writes it.

:func:`keep_freed_memory` tells glibc (``mallopt``) to serve large requests from its heap as well
(``M_MMAP_MAX = 0``) and to keep up to 2 GB of free memory at the heap's top instead of trimming it
(``M_TRIM_THRESHOLD``). After a few steps (the heap grows until its free blocks fit the step's requests) the steps
reuse the same pages: on a 2-core Zen 3 host the fp32 step of the ``100M`` preset went from ~69,000 page faults to
~2 and its time down by 1.8% (0.982x, every one of 12 alternating rounds faster; ``benchmarks/train_malloc.py``,
RESULTS.md), for 3% more peak resident memory (4374 -> 4511 MB). The
values computed are the same; only where the memory comes from changes. Memory freed in the middle of the heap is
reused by later requests but not returned to the system until the process ends (the price of not trimming), which
suits a process that runs one training loop to its end.

``training.pretrain`` calls it when it trains on the CPU. It does nothing, and says why in :func:`state`, where the
C library is not glibc, or ``LLAMA_MALLOC_KEEP=0`` is set (opt out). It applies to the whole process from the call
on, the allocations of every library in it included.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory", "state", "ENV_VAR"]

ENV_VAR = "LLAMA_MALLOC_KEEP"
M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GB of free memory at the heap's top is kept
_state = "not tried"


def state() -> str:
    """``"on"``, or why :func:`keep_freed_memory` did nothing (``"not tried"`` before it is called)."""
    return _state


def keep_freed_memory() -> str:
    """Let glibc's malloc keep freed memory, large blocks included, for reuse; returns :func:`state`."""
    global _state
    if _state == "on":
        return _state
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = f"off ({ENV_VAR}={os.environ[ENV_VAR]})"
    elif not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _state = "not applied (the C library is not glibc)"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (AttributeError, OSError):
            _state = "not applied (no mallopt in the C library)"
        else:
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _state = "on" if ok else "not applied (mallopt refused the settings)"
    return _state
