"""training.malloc_keep: glibc keeps the memory a step frees, so the next step reuses its pages instead of faulting
in new ones. Each case runs in a fresh interpreter, since the setting holds for the whole process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# twelve "steps", each allocating, writing and freeing 96 MB in torch tensors the sizes of a training step's large
# buffers (above glibc's largest mmap threshold, 32 MB), counting each step's minor page faults
_SCRIPT = """
import json, resource, sys
from training import malloc_keep
if sys.argv[1] == "keep":
    malloc_keep.keep_freed_memory()
import torch
faults = []
for _ in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 << 20).fill_(1.0)  # 64 MB
    b = torch.empty(8 << 20).fill_(2.0)  # 32 MB
    total = float(a.sum() + b.sum())
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"state": malloc_keep.state(), "faults": faults, "total": total}))
"""


def _run(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), mode],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_large_blocks_are_reused_without_page_faults():
    pages = (96 << 20) // 4096  # 24,576 pages of 4 KB (fewer if the kernel gives huge pages)
    plain = _run("plain")
    assert plain["state"] == "not tried"
    # glibc maps and unmaps each block: every step faults its pages in again
    assert min(plain["faults"][1:]) > pages // 8, plain
    kept = _run("keep")
    assert kept["state"] == "on"
    assert kept["total"] == plain["total"] == float(16 << 20) + 2.0 * (8 << 20)
    # the first step takes the memory from the system; later steps reuse it, except that the heap still grows now
    # and then (by 32-64 MB) while its free blocks settle into a layout that fits the requests (fragmentation: the
    # small allocations between the large ones move; measured 57,344 faults over steps 2-12 at worst, plain 270,358)
    assert kept["faults"][0] > pages // 8, kept
    assert sum(kept["faults"][1:]) < sum(plain["faults"][1:]) / 3, (kept, plain)
    assert sum(f < pages // 50 for f in kept["faults"][1:]) >= len(kept["faults"][1:]) // 3, kept


def test_opt_out_leaves_malloc_alone():
    off = _run("keep", LLAMA_MALLOC_KEEP="0")
    assert off["state"] == "off (LLAMA_MALLOC_KEEP=0)"
    assert min(off["faults"][1:]) > (96 << 20) // 4096 // 8, off
