"""Building the project's small native libraries: C or C++ source compiled on first use with the system compiler
for this CPU, cached under ``$XDG_CACHE_HOME/llama-hf`` by a hash of everything that decides the output (source,
flags, compiler, CPU, torch version where it links torch), and loaded from the cache afterwards.

Used by :mod:`.cpu_linear` (the few-row product and its op) and :mod:`.cpu_attention` (one-query attention).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def disabled(env_var: str) -> bool:
    """Whether ``env_var`` turns a kernel off (``0``, ``false``, ``no``, ``off``; unset means on)."""
    return os.environ.get(env_var, "1").strip().lower() in ("0", "false", "no", "off")


def define_op(schema: str, fake) -> torch.library.Library:
    """Define ``llama_hf::<schema>`` with its fake (shape) function, once a process (a module reload reuses the
    definition). Keep the returned Library alive: it holds the registrations."""
    lib = torch.library.Library("llama_hf", "FRAGMENT")
    qualname = "llama_hf::" + schema.split("(", 1)[0]
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        lib.define(schema)
        torch.library.register_fake(qualname, fake, lib=lib)
    return lib


# The dispatcher is process-wide, and one process may hold several copies of these modules: the installed package
# and each copy that ``trust_remote_code`` imports from a Hub folder (``transformers_modules.<folder>...``). What a
# copy registers with the dispatcher is therefore kept where every copy finds it: a module of its own in sys.modules.
_SHARED = "_llama_hf_dispatcher_registrations"


def _python_kernels() -> dict:
    """{op name: the Library that holds its Python CPU kernel}, shared by every copy of the package."""
    holder = sys.modules.get(_SHARED)
    if holder is None:
        fresh = types.ModuleType(_SHARED, "Python kernels registered by modeling_llama (any copy of it)")
        fresh.python_kernels = {}
        holder = sys.modules.setdefault(_SHARED, fresh)
    return holder.python_kernels


def register_python_kernel(name: str, fn) -> None:
    """Register ``fn`` as ``llama_hf::<name>``'s CPU kernel, unless the op has a CPU kernel already (this copy's or
    another copy's, Python or C++): registering a second one makes torch warn that it overrides the first."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("llama_hf::" + name, "CPU"):
        lib = torch.library.Library("llama_hf", "IMPL")
        lib.impl(name, fn, "CPU")
        _python_kernels()[name] = lib


def drop_python_kernel(name: str) -> None:
    """Unregister ``llama_hf::<name>``'s Python CPU kernel, whichever copy registered it (before loading a library
    whose static initialiser registers the C++ one for CPU)."""
    _python_kernels().pop(name, None)  # the Library's last reference: its finalizer unregisters the kernel


def c_compilers() -> tuple:
    return (os.environ.get("CC"), "cc", "gcc", "clang")


def cxx_compilers() -> tuple:
    return (os.environ.get("CXX"), "c++", "g++", "clang++")


def cpu_signature() -> str:
    """The lines of /proc/cpuinfo that decide what ``-march=native`` emits (so a cache shared between machines
    never hands one CPU another's instructions)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("vendor_id", "model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def build(
    stem: str, source: str, suffix: str, compilers: tuple, flag_sets: list, key: tuple = (), cached_only: bool = False
) -> Path | None:
    """``source`` compiled into a shared object with the first of ``compilers`` found, trying each flag set in turn
    (the first that compiles wins), cached under ``$XDG_CACHE_HOME/llama-hf`` (the temp directory if that is not
    writable) by a hash of everything that decides the output; ``None`` where no compiler is found or no flag set
    compiles, and with ``cached_only`` where it has not been built yet (nothing is compiled then)."""
    cc = next(filter(None, (shutil.which(c) for c in compilers if c)), None)
    if cc is None:
        return None
    parts = [source, *(" ".join(f) for f in flag_sets), os.path.realpath(cc), platform.machine(), cpu_signature()]
    name = f"{stem}-{hashlib.sha256(chr(0).join([*parts, *key]).encode()).hexdigest()[:16]}.so"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-hf"
    dirs = [cache, Path(tempfile.gettempdir()) / f"llama-hf-{os.getuid()}"]
    for d in dirs:
        if (d / name).is_file():
            return d / name
    if cached_only:
        return None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src, out = Path(tmp) / f"source{suffix}", Path(tmp) / "out.so"
                src.write_text(source)
                logger.info("compiling %s (once; cached in %s)", stem, d)
                for flags in flag_sets:
                    cmd = [cc, str(src), *flags, "-o", str(out)]  # libraries after the source that needs them
                    if subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0:
                        os.replace(out, d / name)  # atomic: concurrent processes may race here, harmlessly
                        return d / name
            return None  # the compiler refused the source: no other folder will change that
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def torch_flags() -> list[str] | None:
    """Compiler flags that build a library registering torch operators (``TORCH_LIBRARY_IMPL``) against this torch:
    its headers, its ABI, linking ``torch_cpu`` and ``c10``; ``None`` for a torch install without its C++ headers.
    Pass ``key=(torch.__version__,)`` to :func:`build` with them: one build per torch."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "library.h").is_file():
        return None
    return [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
