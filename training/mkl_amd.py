"""Let Intel MKL run its fast matrix-product kernels on AMD CPUs.

torch's CPU wheels do their float32 matrix products (``mm``/``addmm``/``bmm``, forward and backward) in the Intel
oneMKL linked into ``libtorch_cpu.so`` (oneMKL 2024.2 in torch 2.13). MKL chooses its kernels by CPU *vendor* as
well as by instruction set: on a CPU that is not "GenuineIntel" it takes slower code paths even where the CPU has
the same AVX2/FMA (or AVX-512) units. On a 2-core AMD EPYC Zen 3 (AVX2 + FMA) this session measured the training
step's product shapes at 78-122 GFLOP/s by default and 134-155 GFLOP/s with the fix below (a core peaks at ~90).

MKL asks one exported function, ``mkl_serv_intel_cpu_true``, whether the CPU is Intel's. :func:`enable` builds a
tiny shared object that defines that function to return 1 and loads it into the process's global symbol scope
*before* torch is imported, so that ``libtorch_cpu.so`` binds its calls to it; MKL then dispatches on the
instruction set alone, as it does on Intel CPUs. This is the well-known workaround (the same as
``LD_PRELOAD``-ing a "fake Intel" library); it changes which of MKL's kernels run, not what they compute: the
results are float32 matrix products either way, summed in a different order.

``import training`` calls :func:`enable`, so every training entry point (``python -m training.pretrain``,
``accelerate launch -m training...``, each launched worker alike) gets it. It does nothing, and says why in
:func:`state`, where it cannot or need not act:

- the CPU is not AMD's (Intel CPUs already get the fast paths), or the machine is not x86-64 Linux;
- torch is already imported (its libraries are bound at load; import ``training`` first, or use ``LD_PRELOAD``);
- no C compiler is found (``$CC``, ``cc``, ``gcc`` or ``clang``; torch.compile on CPU needs one too);
- ``LLAMA_MKL_AMD=0`` is set (opt out).

The compiled object is cached under ``$XDG_CACHE_HOME/llama-hf`` (default ``~/.cache/llama-hf``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["enable", "active", "state", "shim_path", "cpu_vendor", "ENV_VAR"]

ENV_VAR = "LLAMA_MKL_AMD"
_SYMBOL = "mkl_serv_intel_cpu_true"
_SOURCE = f"int {_SYMBOL}(void) {{ return 1; }}\n"
_state = "not tried"


def state() -> str:
    """``"enabled"``, or why :func:`enable` did nothing (``"not tried"`` before it is called)."""
    return _state


def cpu_vendor() -> str:
    """``vendor_id`` from /proc/cpuinfo (``AuthenticAMD``, ``GenuineIntel``), or ``""``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llama-hf"


def shim_path() -> Path | None:
    """The shared object defining ``mkl_serv_intel_cpu_true() == 1``, compiled on first use and cached (in the temp
    directory if the cache directory is not writable); ``None`` if no C compiler is found or the compile fails."""
    tag = hashlib.sha256((_SOURCE + platform.machine()).encode()).hexdigest()[:16]
    name = f"mkl_intel_cpu_true-{tag}.so"
    dirs = [_cache_dir(), Path(tempfile.gettempdir()) / f"llama-hf-{os.getuid()}"]
    for d in dirs:
        if (d / name).is_file():
            return d / name
    cc = next(filter(None, (shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c)), None)
    if cc is None:
        return None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src, out = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
                src.write_text(_SOURCE)
                cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src)]
                subprocess.run(cmd, check=True, capture_output=True, timeout=60)
                os.replace(out, d / name)  # atomic: the workers of one launch may race here, harmlessly
            return d / name
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def enable(force: bool = False) -> str:
    """Make MKL (torch's float32 BLAS) use its Intel code paths on this AMD CPU; returns :func:`state`.

    Must run before ``import torch`` in the process. ``force`` skips the vendor check (on an Intel CPU the
    kernels are the same either way; the tests use it to check the mechanism on any x86-64 Linux machine)."""
    global _state
    if _state == "enabled":
        return _state
    vendor = cpu_vendor()
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = f"disabled ({ENV_VAR}={os.environ[ENV_VAR]})"
    elif not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        _state = "not needed (not x86-64 Linux)"
    elif not force and vendor != "AuthenticAMD":
        _state = f"not needed (CPU vendor {vendor or 'unknown'})"
    elif active():
        _state = "enabled"  # already done from outside, e.g. LD_PRELOAD
    elif "torch" in sys.modules:
        _state = "not applied: torch was imported first (import training before torch, or LD_PRELOAD the shim)"
    else:
        path = shim_path()
        if path is None:
            _state = "not applied: no C compiler could build the shim ($CC, cc, gcc, clang)"
        else:
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                _state = "enabled"
            except OSError as e:
                _state = f"not applied: the shim failed to load ({e})"
    return _state


def active() -> bool:
    """Whether the process's global symbol scope answers MKL's vendor question with 1 (Intel): true after
    :func:`enable` or an ``LD_PRELOAD``-ed equivalent. False where nothing in the global scope defines the function
    (torch loads its MKL symbols locally), e.g. on Intel CPUs, where nothing is needed."""
    try:
        fn = ctypes.CDLL(None)[_SYMBOL]
    except (AttributeError, OSError):
        return False
    fn.restype = ctypes.c_int
    return fn() == 1
