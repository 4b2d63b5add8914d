"""training.pretrain end to end on one CPU process: loss falls, metrics, checkpoints, exact resume after SIGKILL,
the non-finite guard, export, plots, and clear errors."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT
from safetensors.torch import load_file

from modeling_llama import LlamaForCausalLM
from training import malloc_keep
from training.metrics import read_metrics
from training.pretrain import main

BASE = [
    "--config",
    str(REPO_ROOT / "training" / "configs" / "tiny.yaml"),
    "--tokenizer_train",
    '{"inputs": ["embedded:shakespeare"], "vocab_size": 512}',
    "--seq_length",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "2",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "3",
    "--report_to",
    "[]",
    "--progress",
    "false",
    "--eval_sequences",
    "8",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def args(run: Path, cache: Path, *extra: str) -> list[str]:
    return [*BASE, "--output_dir", str(run), "--data_cache_dir", str(cache), *extra]


def test_tiny_run_end_to_end(tmp_path, cache):
    run = tmp_path / "run"
    assert (
        main(
            args(
                run,
                cache,
                "--max_steps",
                "40",
                "--save_steps",
                "10",
                "--save_total_limit",
                "2",
                "--eval_steps",
                "20",
                "--logging_steps",
                "5",
                "--peak_flops",
                "1e12",
                "--sample_prompts",
                '["ROMEO."]',
                "--sample_max_new_tokens",
                "5",
            )
        )
        == 0
    )
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    # training on the CPU keeps freed memory for the next step (glibc; see test_malloc_keep)
    assert malloc_keep.state() == ("on" if platform.libc_ver()[0] == "glibc" else malloc_keep.state())
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"):
        assert all(r[key] is not None for r in rows), key
    assert rows[-1]["tokens"] == 40 * 8 * 32
    assert rows[0]["mfu"] > 0 and rows[0]["lr"] == pytest.approx(1e-3)  # 3e-3 * 1/3 warmup
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert rows[-1]["val_ppl"] == pytest.approx(2.718281828 ** rows[-1]["val_loss"], rel=1e-6)
    # the resolved config, checkpoints (rotated), tensorboard-free, tokenizer and export
    resolved = (run / "config.yaml").read_text()
    assert "max_steps: 40" in resolved and "seq_length: 32" in resolved
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-00000030", "checkpoint-00000040"]
    ours = LlamaForCausalLM.from_pretrained(run / "hf")
    stock = transformers.AutoModelForCausalLM.from_pretrained(run / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    ids = tok(["To be, or not", "ROMEO."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, stock(**ids).logits)
    # export of a checkpoint on demand gives the same weights as the final export
    from training.export_hf import main as export_main

    assert export_main(["--checkpoint", str(run), "--output_dir", str(tmp_path / "exported")]) == 0
    a, b = load_file(run / "hf" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from training.plot import main as plot_main

    assert plot_main([str(run)]) == 0
    assert (run / "loss.png").stat().st_size > 1000 and (run / "lr.png").stat().st_size > 1000


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_exact_resume_after_sigkill(tmp_path, cache):
    steps = ["--max_steps", "16", "--save_steps", "4", "--eval_steps", "0", "--save_total_limit", "10"]
    assert main(args(tmp_path / "straight", cache, *steps)) == 0
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "training.pretrain", *args(run, cache, *steps)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / "checkpoint-00000008"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-2000:]
    assert not (run / "checkpoints" / "checkpoint-00000016").exists(), "killed too late to test anything"
    assert main(args(run, cache, *steps, "--resume_from_checkpoint", "latest")) == 0
    a, b = _params(tmp_path / "straight" / "hf"), _params(run / "hf")
    assert all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"
    straight = [
        (r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
    ]
    resumed = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl")]
    assert resumed == straight  # bit-identical per-step losses, one line per step


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, cache, capsys):
    run = tmp_path / "nan"
    assert (
        main(
            args(
                run, cache, "--max_steps", "8", "--save_steps", "4", "--eval_steps", "0", "--debug_nan_steps", "[3, 6]"
            )
        )
        == 0
    )
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["skipped"]] == [3, 6] and rows[-1]["skipped_total"] == 2
    assert all(r["loss"] is not None and not r["skipped"] for r in rows if r["step"] not in (3, 6))
    # K in a row: stop with a clear error; the last good checkpoint stays
    run = tmp_path / "diverged"
    code = main(
        args(
            run,
            cache,
            "--max_steps",
            "12",
            "--save_steps",
            "4",
            "--eval_steps",
            "0",
            "--debug_nan_steps",
            "[6, 7, 8]",
            "--max_consecutive_nonfinite",
            "3",
        )
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "3 consecutive steps (6..8) had a non-finite loss or gradient norm" in err
    assert "checkpoint-00000004" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000004"]
    assert (
        main(
            args(
                run,
                cache,
                "--max_steps",
                "6",
                "--save_steps",
                "4",
                "--eval_steps",
                "0",
                "--resume_from_checkpoint",
                "latest",
            )
        )
        == 0
    )  # the checkpoint is usable


def test_errors_are_clear(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert main(args(run, cache, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "0")) == 0
    assert main(args(run, cache, "--max_steps", "2")) == 2
    assert "already holds checkpoints; pass --resume_from_checkpoint latest" in capsys.readouterr().err
    assert main(args(tmp_path / "r2", cache, "--resume_from_checkpoint", "latest")) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert main(args(tmp_path / "r3", cache, "--data_sources", json.dumps([{"name": "x", "inputs": [str(bad)]}]))) == 2
    assert "bad.jsonl:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert main(args(tmp_path / "r4", cache, "--global_batch_tokens", "1000")) == 2
    assert "not a multiple of seq_length 32" in capsys.readouterr().err


def test_compile_matches_eager(tmp_path, cache, capsys):
    """compile: true (regional torch.compile of the layers + compiled loss) with the CPU's default attention
    (``auto``: blocked_causal) trains the same model as eager mode with SDPA: same per-step losses and gradient
    norms up to float rounding, same exported weight names and values."""
    steps = ["--max_steps", "4", "--save_steps", "4", "--eval_steps", "4", "--activation_checkpointing", "selective"]
    assert main(args(tmp_path / "eager", cache, *steps, "--attn_implementation", "sdpa")) == 0
    assert "attention sdpa" in capsys.readouterr().err
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(args(tmp_path / "compiled", cache, *steps, "--compile", "true")) == 0
    assert "attention blocked_causal, fused LM head + loss, compiled" in capsys.readouterr().err
    assert counters["stats"]["unique_graphs"] >= 2  # the layers' graph(s) and the loss were really compiled
    eager = read_metrics(tmp_path / "eager" / "metrics.jsonl")
    compiled = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    a, b = _params(tmp_path / "eager" / "hf"), _params(tmp_path / "compiled" / "hf")
    assert sorted(a) == sorted(b)  # no "_orig_mod." prefixes: weight names are unchanged by compilation
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_compile_refuses_eager_attention(tmp_path, cache, capsys):
    assert main(args(tmp_path / "r", cache, "--compile", "true", "--attn_implementation", "eager")) == 2
    assert "compile needs attn_implementation auto, sdpa, blocked_causal" in capsys.readouterr().err
