"""training.mkl_amd: MKL's Intel kernels on AMD CPUs. Each case runs in a fresh interpreter, since the switch has to
act before torch is loaded. The kernels it selects are checked against float64 products and against a plain
process's training step; its speed is shown in benchmarks/ (bench_cpu's per-process training table)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import textwrap

import pytest
from conftest import REPO_ROOT, run_python_json

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="x86-64 Linux only"
)
needs_cc = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler to build the shim"
)


def _run(parts: tuple[str, ...], tmp_path, **env: str) -> dict:
    """Run the code ``parts`` (each dedented) in a fresh interpreter; its last stdout line is JSON."""
    code = "\n".join(textwrap.dedent(p) for p in parts)
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    full_env.pop("LD_PRELOAD", None)
    return run_python_json(code, cwd=REPO_ROOT, env=full_env)


# one tiny training step (forward, fused loss, backward) in whatever MKL mode the process is in, plus a float32
# matrix product of the step's kind of shape against float64
_STEP = """
    import torch
    from modeling_llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    a, b = torch.randn(300, 257), torch.randn(257, 520)
    ref = a.double() @ b.double()
    gemm_err = ((a @ b).double() - ref).abs().max().item() / ref.abs().max().item()
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 512, (3, 33))
    loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
    loss.backward()
    grads = {n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters()}
"""


_REPORT = """
    import json
    print(json.dumps({"state": mkl_amd.state(), "active": mkl_amd.active(), "gemm_err": gemm_err,
                      "loss": loss.item(), "grads": grads}))
"""


@needs_cc
def test_switch_loads_before_torch_and_keeps_results(tmp_path):
    # force: the vendor check skipped, so that the mechanism is checked on Intel CPUs too
    switched = _run(("from training import mkl_amd; mkl_amd.enable(force=True)", _STEP, _REPORT), tmp_path)
    # torch imported before training: nothing can be switched any more (state says why), MKL's default kernels
    plain = _run((_STEP, "from training import mkl_amd", _REPORT), tmp_path)
    assert switched["state"] == "enabled" and switched["active"] is True
    assert list((tmp_path / "cache" / "llama-hf").glob("mkl_intel_cpu_true-*.so")), "the shim is cached"
    assert plain["active"] is False
    assert "torch was imported first" in plain["state"] or plain["state"].startswith("not needed")
    # float32 products as accurate as float32 allows (K=257: a few ulps), and the same training step
    assert switched["gemm_err"] < 1e-5 and plain["gemm_err"] < 1e-5
    assert abs(switched["loss"] - plain["loss"]) < 1e-5
    for name, g in plain["grads"].items():
        assert switched["grads"][name] == pytest.approx(g, rel=1e-3, abs=1e-6), name


def test_opt_out_and_vendor_rule(tmp_path):
    out = _run(
        (
            """
            import json
            from training import mkl_amd
            print(json.dumps({"state": mkl_amd.state(), "forced": mkl_amd.enable(force=True),
                              "active": mkl_amd.active(), "vendor": mkl_amd.cpu_vendor()}))
            """,
        ),
        tmp_path,
        LLAMA_MKL_AMD="0",
    )
    assert out["state"] == out["forced"] == "disabled (LLAMA_MKL_AMD=0)" and out["active"] is False
    auto = _run(
        (
            """
            import json
            from training import mkl_amd
            print(json.dumps({"state": mkl_amd.state(), "vendor": mkl_amd.cpu_vendor()}))
            """,
        ),
        tmp_path,
    )
    if auto["vendor"] == "AuthenticAMD":  # import training switched it on by itself (where a compiler exists)
        assert auto["state"] == "enabled" or auto["state"].startswith("not applied: no C compiler")
    else:
        assert auto["state"] == f"not needed (CPU vendor {auto['vendor'] or 'unknown'})"
