"""modeling_llama.cpu_linear: the streaming kernel for a few rows (fp32, and bf16 weights summed in fp32), against
float64 products and F.linear. Its speed is shown in benchmarks/ (bench_cpu's decode table, batch 8)."""

from __future__ import annotations

import functools
import itertools
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, op_calls, run_python_json

from modeling_llama import cpu_linear

has_cc = any(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c)
has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c)
needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler built the kernel")


@pytest.mark.skipif(not has_cc, reason="no C compiler")
def test_kernel_builds_where_a_compiler_is():
    # a compiler is here (torch.compile on CPU needs one too): a failed build must not pass unnoticed as fallback
    assert cpu_linear.available()
    path = cpu_linear.library_path()
    assert path is not None and path.is_file() and path.suffix == ".so"


@pytest.mark.skipif(not (has_cc and has_cxx), reason="no C and C++ compilers")
def test_op_runs_in_cpp_where_a_cxx_compiler_is():
    """The op's CPU kernel is the C++ glue (a failed build must not pass unnoticed as the slower Python one), and it
    gives the Python implementation's bits: the same kernel behind both, the same fallbacks."""
    assert cpu_linear.native()
    cpu_line = next(line for line in torch._C._dispatch_dump(cpu_linear._OP).splitlines() if line.startswith("CPU:"))
    assert ".cpp" in cpu_line and "native_build.py" not in cpu_line, cpu_line
    g = torch.Generator().manual_seed(4)
    rows = (1, 3, 8, cpu_linear.MAX_ROWS)
    cases = [(torch.randn(r, 40, generator=g), torch.randn(70, 40, generator=g)) for r in rows]
    cases += [(torch.randn(2, 3, 40, generator=g), torch.randn(40, 70, generator=g).t())]  # (..., K); strided weight
    cases += [(torch.randn(40, 5, generator=g).t(), torch.randn(70, 40, generator=g))]  # strided rows
    cases += [(x.bfloat16(), w.bfloat16()) for x, w in cases]
    cases += [(torch.randn(cpu_linear.MAX_ROWS + 1, 40, generator=g), torch.randn(70, 40, generator=g))]  # F.linear
    cases += [(torch.randn(4, 40, generator=g).half(), torch.randn(70, 40, generator=g).half())]  # F.linear
    for x, w in cases:
        y = torch.ops.llama_hf.small_batch_linear(x, w)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
        assert torch.equal(y, cpu_linear._small_batch_linear(x, w)), (x.shape, x.dtype)


@pytest.mark.skipif(not has_cc, reason="no C compiler")
def test_op_stays_in_python_without_cxx_or_when_asked(tmp_path):
    code = """
import json, torch
from modeling_llama import cpu_linear
g = torch.Generator().manual_seed(5)
x, w = torch.randn(8, 64, generator=g), torch.randn(48, 64, generator=g)
cpu = next(l for l in torch._C._dispatch_dump(cpu_linear._OP).splitlines() if l.startswith("CPU:"))
xb, wb = x.bfloat16(), w.bfloat16()  # bf16: the kernel's bf16 rows in, bf16 out, within a rounding of the product
yb, ref = cpu_linear.small_batch_linear(xb, wb), xb.double() @ wb.double().t()
print(json.dumps({"native": cpu_linear.native(), "available": cpu_linear.available(),
                  "python": "native_build.py" in cpu,  # (where the Python kernel is registered)
                  "close": torch.allclose(cpu_linear.small_batch_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5),
                  "bf16": yb.dtype == torch.bfloat16 and bool(((yb.double() - ref).abs() <= 2**-8 * ref.abs()).all())}))
"""
    base = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    broken = {**base, "XDG_CACHE_HOME": str(tmp_path / "broken"), "CXX": shutil.which("false") or "/bin/false"}
    asked = {**base, "XDG_CACHE_HOME": str(tmp_path / "asked"), cpu_linear.ENV_VAR: "python"}
    for env in (broken, asked):
        assert run_python_json(code, cwd=REPO_ROOT, env=env) == {
            "native": False, "available": True, "python": True, "close": True, "bf16": True
        }  # fmt: skip
    assert not any(tmp_path.rglob("llama_hf_ops-*.so"))  # the C kernel was built, not the glue


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 13, cpu_linear.MAX_ROWS])
def test_matches_float64_product(rows):
    g = torch.Generator().manual_seed(rows)
    # K tails, N split unevenly, and K >= 4096 (two weight rows at a time; odd N: one row left over)
    for n, k in [(1, 1), (5, 7), (33, 8), (300, 37), (770, 768), (64, 2051), (65, 4100), (6, 4096)]:
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        ref = x.double() @ w.double().t()
        y = cpu_linear.small_batch_linear(x, w)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        scale = (x.double().abs() @ w.double().abs().t()).max().item()
        assert (y.double() - ref).abs().max().item() <= 1e-6 * scale, (rows, n, k)


@pytest.mark.skipif(not cpu_linear.available(torch.bfloat16), reason="no C compiler built the kernel")
@pytest.mark.parametrize("rows", [1, 2, 8, 9, cpu_linear.MAX_ROWS])
def test_bf16_weights_sum_in_float32(rows):
    """bf16 x and weights: the product of their exact fp32 values, summed in fp32 and rounded to bf16 once (within
    one bf16 rounding of the float64 product; F.linear's own bf16 result may differ by such a rounding)."""
    g = torch.Generator().manual_seed(100 + rows)
    for n, k in [(1, 1), (5, 7), (33, 8), (300, 37), (770, 768), (64, 2051), (65, 4100)]:
        x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        y = cpu_linear.small_batch_linear(x, w)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        ref = x.double() @ w.double().t()
        scale = (x.double().abs() @ w.double().abs().t()).max().item()
        assert ((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * scale).all(), (rows, n, k)


@needs_kernel
def test_shapes_views_and_threads():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g)
    x = torch.randn(2, 3, 40, generator=g)  # (..., K): 6 rows
    torch.testing.assert_close(cpu_linear.small_batch_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 4, generator=g).t()  # a non-contiguous (4, 40) view
    wt = torch.randn(40, 96, generator=g).t()  # and a non-contiguous weight
    torch.testing.assert_close(cpu_linear.small_batch_linear(xt, wt), F.linear(xt, wt), rtol=1e-5, atol=1e-5)
    # each output is summed by one thread in a fixed order: the thread count does not change a bit, nor whether a
    # weight row is taken alone or with its neighbour (K >= 4096; odd N and the threads' shares move the pairs)
    # (bf16 too where the kernel has it: its groups of 8 rows take weight rows in pairs from K = 4096 on)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_linear.available(torch.bfloat16) else [])
    for (n, k), dtype in itertools.product([(1000, 256), (1001, 4100)], dtypes):
        big_w, big_x = torch.randn(n, k, generator=g).to(dtype), torch.randn(11, k, generator=g).to(dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = cpu_linear.small_batch_linear(big_x, big_w)
            torch.set_num_threads(max(2, threads))
            many = cpu_linear.small_batch_linear(big_x, big_w)
            alone = torch.cat([cpu_linear.small_batch_linear(big_x, big_w[i : i + 1]) for i in range(5)], dim=1)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, many) and torch.equal(alone, many[:, :5])


def _compiled(tmp_path, name: str, flags: list[str]):
    """The kernel's source compiled here with exactly ``flags`` (not the module's cached build), its two entries
    typed."""
    import ctypes
    import subprocess

    cc = next(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c))
    src, lib = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(cpu_linear._SOURCE)
    subprocess.run([cc, *flags, "-o", str(lib), str(src)], check=True, capture_output=True)
    so = ctypes.CDLL(str(lib))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for entry in (so.llama_small_batch_linear, so.llama_small_batch_linear_bf16, so.llama_packed_linear_bf16):
        entry.argtypes = [ptr, i64, ptr, i64, i64, ptr]  # x, M, w, N, K, y
    return so


@pytest.mark.skipif(not has_cc, reason="no C compiler")
def test_build_without_openmp_is_single_threaded_and_right(tmp_path):
    # what library_path() falls back to where the compiler has no OpenMP
    fn = _compiled(tmp_path, "k", cpu_linear._FLAGS_NO_OPENMP).llama_small_batch_linear
    g = torch.Generator().manual_seed(3)
    x, w, y = torch.randn(11, 45, generator=g), torch.randn(70, 45, generator=g), torch.full((11, 70), float("nan"))
    assert fn(x.data_ptr(), 11, w.data_ptr(), 70, 45, y.data_ptr()) == 0
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert fn(x.data_ptr(), 0, w.data_ptr(), 70, 45, y.data_ptr()) == -1  # no rows: refused


@pytest.mark.skipif(not has_cc, reason="no C compiler")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")
def test_bf16_entry_rounds_its_float32_sums_as_torch_does(tmp_path):
    """The bf16 entry takes bf16 rows and writes bf16 outputs. Built without the bf16 dot-product form (what an AVX2
    CPU builds), its float32 sums are the fp32 entry's on the widened values, so its outputs must be exactly those
    sums rounded by torch; built as this CPU builds it (the dot-product form where there is one), within one bf16
    rounding of the float64 product. NaN and infinity pass through."""
    entries = {}
    builds = [("widening", ["-mno-avx512bf16"]), ("native", [])]
    if {"avx2", "fma"} <= set(cpu_linear.cpu_signature().split()):  # and as an AVX2 CPU builds it, where it runs
        builds.append(("avx2", ["-march=haswell"]))
    for name, extra in builds:
        so = _compiled(tmp_path, name, [*cpu_linear._FLAGS, *cpu_linear._vendor_defines(), *extra])
        assert so.llama_small_batch_linear_bf16_io() == 1
        entries[name] = so
    assert not any(so.llama_small_batch_linear_forms() & 1 for name, so in entries.items() if name != "native")
    g = torch.Generator().manual_seed(7)
    for rows, n, k in [(2, 5, 7), (3, 70, 45), (8, 300, 768), (9, 33, 2051), (16, 65, 4100)]:
        x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        x[rows - 1, 1], w[2 % n, 0] = float("nan"), float("inf")  # a NaN last row, an infinite column 2 % n
        x32, w32 = x.float(), w.float()  # (held: the kernel gets bare pointers)
        for name, so in entries.items():
            y32 = torch.empty(rows, n)  # the same build's fp32 entry on the widened values
            assert so.llama_small_batch_linear(x32.data_ptr(), rows, w32.data_ptr(), n, k, y32.data_ptr()) == 0
            y = torch.full((rows, n), 7.0, dtype=torch.bfloat16)
            assert so.llama_small_batch_linear_bf16(x.data_ptr(), rows, w.data_ptr(), n, k, y.data_ptr()) == 0
            assert torch.equal(y.isnan(), y32.isnan()) and y.isnan()[-1].all(), name
            finite = ~y32.isnan()
            if name != "native":  # the widening form: its fp32 entry's sums, rounded here by torch
                assert torch.equal(y[finite].view(torch.int16), y32.bfloat16()[finite].view(torch.int16))
            else:
                ref = (x.double() @ w.double().t())[finite]
                scale = (x.double().abs() @ w.double().abs().t())[finite].nan_to_num(posinf=0).max().item()
                got = y[finite].double()
                same_inf = got.isinf() & (got == ref)
                assert (same_inf | ((got - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * scale)).all(), (rows, n, k)
        assert entries["native"].llama_small_batch_linear_bf16(x.data_ptr(), 0, w.data_ptr(), n, k, y.data_ptr()) == -1


def test_other_inputs_go_to_f_linear():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=g)
    many = torch.randn(cpu_linear.MAX_ROWS + 1, 24, generator=g)  # more rows than the kernel takes
    assert torch.equal(cpu_linear.small_batch_linear(many, w), F.linear(many, w))
    xh, wh = torch.randn(2, 24, generator=g).half(), w.half()  # float16: not the kernel's
    assert torch.equal(cpu_linear.small_batch_linear(xh, wh), F.linear(xh, wh))
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error
        cpu_linear.small_batch_linear(torch.randn(2, 24, generator=g), w.bfloat16())
    empty = torch.randn(0, 24)
    assert cpu_linear.small_batch_linear(empty, w).shape == (0, 16)
    with pytest.raises(RuntimeError):  # K disagrees: F.linear's own error
        cpu_linear.small_batch_linear(torch.randn(2, 23), w)


@needs_kernel
def test_compiled_graph_calls_the_op():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(48, 32, generator=g), torch.randn(3, 32, generator=g)

    def f(x, w):
        return torch.ops.llama_hf.small_batch_linear(torch.relu(x), w) * 2 + 1

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, w)
    torch.testing.assert_close(out, F.linear(torch.relu(x), w) * 2 + 1, rtol=1e-5, atol=1e-5)


def test_opt_out_computes_f_linear(tmp_path):
    code = """
import json, torch, torch.nn.functional as F
from modeling_llama import cpu_linear
x, w = torch.randn(4, 64), torch.randn(32, 64)
print(json.dumps({"available": cpu_linear.available(),
                  "same": torch.equal(cpu_linear.small_batch_linear(x, w), F.linear(x, w))}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CACHE_HOME": str(tmp_path), cpu_linear.ENV_VAR: "0"}
    assert run_python_json(code, cwd=REPO_ROOT, env=env) == {"available": False, "same": True}
    assert not any(tmp_path.rglob("*.so"))  # nothing was built


def _op_calls(fn) -> int:
    """How many times ``fn()`` calls the streaming op."""
    return op_calls(fn, cpu_linear._OP)


@needs_kernel
def test_model_projections_take_the_kernel_for_inference_on_a_few_rows():
    """Our model's linears are SmallBatchLinear: without autograd, on at most MAX_ROWS rows, every projection and
    the LM head go through the kernel; with autograd, or on more rows, none does (F.linear)."""
    from conftest import twin_models

    ours, stock = twin_models(seed=2)
    n_layers = ours.config.num_hidden_layers
    few = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(0))  # 10 rows
    many = torch.randint(3, 512, (3, 6), generator=torch.Generator().manual_seed(1))  # 18 rows
    with torch.no_grad():
        assert _op_calls(lambda: ours(few)) == 7 * n_layers + 1
        assert _op_calls(lambda: ours(many)) == 0
        assert _op_calls(lambda: stock(few)) == 0  # (stock's nn.Linear: untouched)
        logits = ours(few).logits
        ref = stock(few).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert _op_calls(lambda: ours(few).logits.sum().backward()) == 0  # training: F.linear, with its backward
    assert all(p.grad is not None for p in ours.parameters())


@needs_kernel
def test_generate_on_cpu_through_the_kernel_gives_stock_greedy_tokens():
    from conftest import twin_models

    ours, stock = twin_models(seed=5)
    prompt = torch.randint(3, 512, (4, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        calls = _op_calls(lambda: ours.generate(prompt, **kwargs))
        assert torch.equal(ours.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))
    # the 9 steps after the 24-row prefill, and the prefill's LM head (logits of the last position only: 4 rows)
    assert calls == 9 * (7 * ours.config.num_hidden_layers + 1) + 1
    ours_bf16, stock_bf16 = ours.to(torch.bfloat16), stock.to(torch.bfloat16)
    with torch.no_grad():  # bf16 weights: summed in float32, rounded once, like oneDNN's product
        torch.testing.assert_close(
            ours_bf16(prompt[:2]).logits.float(), stock_bf16(prompt[:2]).logits.float(), rtol=2e-2, atol=2e-2
        )


@needs_kernel
def test_small_batch_linear_module_falls_back_where_the_kernel_does_not_apply():
    g = torch.Generator().manual_seed(6)
    lin = cpu_linear.SmallBatchLinear(40, 24, bias=True)
    x = torch.randn(5, 40, generator=g)  # 5 rows: the kernel's on every CPU (eager_rows)
    with torch.no_grad():
        assert _op_calls(lambda: lin(x)) == 1
        # the row counts eager_rows names, and only those, take the kernel (fp32 and bf16)
        for dtype in (torch.float32, torch.bfloat16):
            rows = cpu_linear.eager_rows(dtype)
            assert 5 in rows and set(rows) <= set(range(1, cpu_linear.MAX_ROWS + 1))
            typed = cpu_linear.SmallBatchLinear(40, 24, bias=False).to(dtype)
            for r in range(1, cpu_linear.MAX_ROWS + 2):
                xr = torch.randn(r, 40, generator=g).to(dtype)
                assert _op_calls(functools.partial(typed, xr)) == (r in rows), (dtype, r)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert _op_calls(lambda: lin(x[0])) == 0  # one 1-D row: F.linear
        half = cpu_linear.SmallBatchLinear(40, 24, bias=False).half()
        assert _op_calls(lambda: half(x.half())) == 0  # float16: no kernel for it
        t = cpu_linear.SmallBatchLinear(40, 24, bias=False)
        t.weight = torch.nn.Parameter(torch.randn(40, 24, generator=g).t())  # not contiguous
        assert _op_calls(lambda: t(x)) == 0 and torch.equal(t(x), F.linear(x, t.weight))
    assert _op_calls(lambda: lin(x)) == 0  # autograd on


@pytest.mark.skipif(not has_cc, reason="no C compiler")
def test_an_eager_forward_does_not_build_the_cpp_glue(tmp_path):
    """A model's eager use builds only the C kernel (~1.5 s); the op's C++ glue (~12 s) is built by native()
    (FastDecoder), and used by eager calls once it exists."""
    code = """
import json, torch
from modeling_llama import cpu_linear
lin = cpu_linear.SmallBatchLinear(64, 48, bias=False)
with torch.no_grad():
    y = lin(torch.randn(4, 64))
cpu = next(l for l in torch._C._dispatch_dump(cpu_linear._OP).splitlines() if l.startswith("CPU:"))
print(json.dumps({"available": cpu_linear.available(), "python": "native_build.py" in cpu}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CACHE_HOME": str(tmp_path)}
    assert run_python_json(code, cwd=REPO_ROOT, env=env) == {"available": True, "python": True}
    assert any(tmp_path.rglob("llama_small_batch_linear-*.so")) and not any(tmp_path.rglob("llama_hf_ops-*.so"))


# ---- packed bf16 weights (pack_weight / packed_linear) ----

needs_packed = pytest.mark.skipif(not cpu_linear.forms().get("packed"), reason="no C compiler built the kernel")
# N multiples of 32 (one block, several, split unevenly between threads), K even: short, not a multiple of 32, long
PACKED_SHAPES = [(32, 2), (32, 38), (96, 770), (2304, 768), (64, 4100)]


def within_a_bf16_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """``y`` (bf16) within one bf16 rounding of the float64 product ``x @ w.T`` (plus float32 summation error)."""
    ref = x.double() @ w.double().t()
    scale = (x.double().abs() @ w.double().abs().t()).max().item()
    return bool(((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * scale).all())


def test_pack_weight_layout_round_trip_and_refusals():
    n, k = 64, 6
    w = torch.arange(n * k, dtype=torch.float32).reshape(n, k).bfloat16()  # (exact in bf16 up to 256)
    p = cpu_linear.pack_weight(w)
    assert p.shape == (n // 32, k // 2, 32, 2) and p.is_contiguous()
    for b, j, c, t in itertools.product(range(n // 32), range(k // 2), (0, 5, 31), (0, 1)):
        assert p[b, j, c, t] == w[32 * b + c, 2 * j + t]
    assert torch.equal(cpu_linear.unpack_weight(p), w)
    out = torch.empty(n * k * 2, dtype=torch.uint8)  # memory of the caller's (huge_pages.empty's is uint8)
    q = cpu_linear.pack_weight(w, out=out)
    assert torch.equal(q, p) and q.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="bytes"):
        cpu_linear.pack_weight(w, out=torch.empty(n * k, dtype=torch.uint8))
    for bad in (
        torch.zeros(48, 6).bfloat16(),
        torch.zeros(64, 5).bfloat16(),
        torch.zeros(64, 6),
        torch.zeros(2, 32, 6),
    ):
        assert not cpu_linear.packable(bad)
        with pytest.raises(ValueError, match="multiple of 32 and K even"):
            cpu_linear.pack_weight(bad)
    with pytest.raises(RuntimeError, match="packed as"):  # an unpacked weight handed to the op
        cpu_linear.packed_linear(torch.zeros(2, 6).bfloat16(), w)


@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 40])
def test_packed_product_matches_float64(rows):
    """Any number of rows (groups of 8 and a tail): within one bf16 rounding of the float64 product, and the op's
    C++ and Python implementations give the same bits (the same kernel)."""
    g = torch.Generator().manual_seed(200 + rows)
    for n, k in PACKED_SHAPES:
        x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        p = cpu_linear.pack_weight(w)
        y = cpu_linear.packed_linear(x, p)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert within_a_bf16_rounding(y, x, w), (rows, n, k)
        assert torch.equal(y, cpu_linear._packed_linear(x, p))
    x3 = torch.randn(2, 3, 38, generator=g).bfloat16()[:, :, :]  # (..., K)
    w = torch.randn(32, 38, generator=g).bfloat16()
    y3 = cpu_linear.packed_linear(x3, cpu_linear.pack_weight(w))
    assert y3.shape == (2, 3, 32) and within_a_bf16_rounding(y3.reshape(6, 32), x3.reshape(6, 38), w)
    xs = torch.randn(38, 5, generator=g).bfloat16().t()  # strided rows
    assert torch.equal(
        cpu_linear.packed_linear(xs, cpu_linear.pack_weight(w)),
        cpu_linear.packed_linear(xs.contiguous(), cpu_linear.pack_weight(w)),
    )


@needs_packed
def test_packed_op_falls_back_to_f_linear_and_compiles():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 40, generator=g).bfloat16()
    p = cpu_linear.pack_weight(w)
    x = torch.randn(3, 40, generator=g)
    with pytest.raises(RuntimeError):  # float32 rows on bf16 weights: F.linear's own dtype error
        cpu_linear.packed_linear(x, p)
    assert cpu_linear.packed_linear(torch.zeros(0, 40).bfloat16(), p).shape == (0, 64)  # no rows: F.linear
    with pytest.raises(RuntimeError):  # K disagrees
        cpu_linear.packed_linear(torch.zeros(2, 38).bfloat16(), p)

    def f(x, p):
        return torch.ops.llama_hf.packed_linear(torch.relu(x), p) * 2

    torch._dynamo.reset()
    xb = x.bfloat16()
    out = torch.compile(f, fullgraph=True)(xb, p)
    assert torch.equal(out, f(xb, p))


@pytest.mark.skipif(not has_cc, reason="no C compiler")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")
def test_packed_entry_in_every_build(tmp_path):
    """The packed entry as each CPU builds it: the widening form (no AVX512-BF16), as an AVX2 CPU builds it where
    this one runs that, and this CPU's own (the dot-product form where it has one); without OpenMP too. Each within
    one bf16 rounding of the float64 product; refusals for bad shapes and no rows."""
    builds = [("widening", ["-mno-avx512bf16"]), ("native", []), ("serial", ["-fno-openmp"])]
    if {"avx2", "fma"} <= set(cpu_linear.cpu_signature().split()):
        builds.append(("avx2", ["-march=haswell"]))
    g = torch.Generator().manual_seed(11)
    for name, extra in builds:
        flags = [*(cpu_linear._FLAGS_NO_OPENMP if name == "serial" else cpu_linear._FLAGS), *extra]
        so = _compiled(tmp_path, name, [*flags, *cpu_linear._vendor_defines()])
        assert so.llama_small_batch_linear_forms() & 4, name
        for rows, (n, k) in zip((1, 3, 8, 13, 17), PACKED_SHAPES):
            x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
            p, y = cpu_linear.pack_weight(w), torch.full((rows, n), 7.0, dtype=torch.bfloat16)
            assert so.llama_packed_linear_bf16(x.data_ptr(), rows, p.data_ptr(), n, k, y.data_ptr()) == 0
            assert within_a_bf16_rounding(y, x, w), (name, rows, n, k)
        assert so.llama_packed_linear_bf16(x.data_ptr(), 0, p.data_ptr(), n, k, y.data_ptr()) == -1
        assert so.llama_packed_linear_bf16(x.data_ptr(), 1, p.data_ptr(), 48, k, y.data_ptr()) == -3  # N % 32
        assert so.llama_packed_linear_bf16(x.data_ptr(), 1, p.data_ptr(), n, 7, y.data_ptr()) == -3  # K odd
