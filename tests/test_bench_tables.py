"""benchmarks/bench_cpu.py's tables, rendered from raw results it wrote on real runs (results/cpu-avx2/*.json):
every row the JSON holds reaches the markdown with its numbers, old files (written before newer columns) included.
The benchmarks themselves take minutes and are not run here."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu-avx2"


def bench_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_row(md: str, header: str, prefix: str) -> str:
    """The row starting with ``prefix`` in the markdown table whose header line contains ``header``."""
    block = next(b for b in md.split("\n\n") if header in b.splitlines()[0])
    return next(x for x in block.splitlines() if x.startswith(prefix))


@pytest.mark.parametrize(
    "name",
    [
        "decode_bf16_kernel.json",
        "decode_prefill_last_logits.json",
        "decode_cpu_linear_run2.json",
        "decode_huge_pages.json",
        "decode_ninth_session.json",
        "decode_small_batch_linear.json",
    ],
)
def test_decode_tables_render_every_row(name):
    raw = json.loads((RESULTS / name).read_text())
    md = bench_script("bench_cpu").to_markdown(raw["meta"], raw["results"])
    rows = raw["results"]["decode"]
    for r in rows:
        if "max_length" in r:  # the long-cache table
            line = next(x for x in md.splitlines() if f"max_length {r['max_length']} |" in x)
            assert f"| {r['fast_tokens_per_s']:.1f} | {r['fast_vs_stock']:.2f}x |" in line
            continue
        line = next(x for x in md.splitlines() if x.startswith(f"| batch {r['batch']}, {r['prompt']}+"))
        assert f"| {r['stock_tokens_per_s']:.1f} | {r['ours_tokens_per_s']:.1f} | {r['ratio']:.2f}x |" in line
        assert f"| {r['fast_fraction_of_bound']:.0%} |" in line
        if "fast_step_fraction_of_bound" in r:
            assert f"| {r['fast_step_fraction_of_bound']:.0%} |" in line
        if "copy_bandwidth_huge_GBps" in r:  # the bound from a copy on huge pages
            huge = table_row(md, "the bound from a copy on huge pages", f"| batch {r['batch']}, ")
            assert f"| {r['fast_huge_page_bytes'] / 2**20:.0f} |" in huge
            assert f"| {r['copy_bandwidth_GBps']:.1f} / {r['copy_bandwidth_huge_GBps']:.1f} |" in huge
            assert f"| {r['fast_step_fraction_of_bound']:.0%} / {r['fast_step_fraction_of_bound_huge']:.0%} |" in huge
        if "fast_bf16_tokens_per_s" in r:
            bf16 = table_row(md, "`dtype=bfloat16`", f"| batch {r['batch']}, ")
            assert f"| {r['fast_bf16_tokens_per_s']:.1f} | {r['fast_bf16_vs_stock']:.2f}x |" in bf16
    if all("fast_step_fraction_of_bound" in r for r in rows):  # a file from the current script: every cell filled
        assert "nan" not in md


def test_kernel_source_at_a_git_revision():
    """``--against REV`` (``cpu_linear_pairs.py``, ``decode_attention.py``) builds a kernel from ``REV``'s module
    (``bench_cpu.source_at``): at HEAD (the file unmodified here) that is the module's own source; an unknown
    revision says which."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None or subprocess.run([git, "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    bench_script("cpu_linear_pairs")  # (it puts its folder on sys.path for bench_cpu itself)
    from bench_cpu import source_at

    from modeling_llama import cpu_attention, cpu_linear

    compared = 0
    for module in (cpu_linear, cpu_attention):
        path = f"modeling_llama/{module.__name__.rsplit('.', 1)[1]}.py"
        if subprocess.run([git, "diff", "--quiet", "HEAD", "--", path], cwd=REPO_ROOT).returncode == 0:
            assert source_at("HEAD", path) == module._SOURCE
            compared += 1
    if not compared:
        pytest.skip("both kernels' modules differ from HEAD here")
    with pytest.raises(SystemExit, match="no-such-revision"):
        source_at("no-such-revision", "modeling_llama/cpu_linear.py")


def test_kernel_comparison_runs_bf16_and_torch_columns():
    """``cpu_linear_pairs.py``'s timing loop on small shapes: the bf16 entry (its output checked against float
    products inside ``bench``) and torch's ``F.linear`` column, each with a time per round."""
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler")
    pairs = bench_script("cpu_linear_pairs")
    from modeling_llama import cpu_linear

    fns = {**pairs._build({"this tree": (cpu_linear._SOURCE, [])}, torch.bfloat16), "F.linear": None}
    row = pairs.bench(fns, [(64, 40), (96, 72)], rows=3, rounds=2, dtype=torch.bfloat16)
    assert row["rows"] == 3 and set(row["ms"]) == {"this tree", "F.linear"}
    assert all(len(v) == 2 and min(v) >= 0 for v in row["ms_rounds"].values())


@pytest.mark.parametrize("name", ["cpu_linear_variants.c", "cpu_linear_packed.c"])
def test_c_harness_builds_with_the_documented_command(tmp_path, name):
    """``benchmarks/cpu_linear_variants.c`` and ``cpu_linear_packed.c`` link with the command the README gives
    (they need ``-lm``: the command without it had stopped linking) and which their own header repeats (the packed
    one builds a stub where the compiler targets no AVX512-BF16)."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    readme = (REPO_ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("cc ") and name in x)
    build = line.split("&&")[0].strip()
    header = (REPO_ROOT / "benchmarks" / name).read_text().split("*/")[0]
    assert build in header
    args = shlex.split(build)
    args[args.index("-o") + 1] = str(tmp_path / "harness")
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "harness").stat().st_size > 0
