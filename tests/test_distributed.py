"""Two real processes over gloo: DDP and DeepSpeed ZeRO-3 through ``accelerate launch``, and FSDP2 (torch's
fully_shard, applied by training.parallel, launched with the FSDP2 accelerate config). Each must give the
single-process losses, validation loss and weights; checkpoints resume and export from sharded states."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from training.metrics import read_metrics
from training.pretrain import main

pytest.importorskip("accelerate")
ACCEL = REPO_ROOT / "training" / "configs" / "accelerate"
COMMON = [
    "--config",
    str(REPO_ROOT / "training" / "configs" / "tiny.yaml"),
    "--tokenizer_train",
    '{"inputs": ["embedded:shakespeare"], "vocab_size": 512}',
    "--seq_length",
    "32",
    "--per_device_train_batch_size",
    "2",
    "--global_batch_tokens",
    "256",
    "--gradient_accumulation_steps",
    "none",
    "--max_steps",
    "6",
    "--save_steps",
    "3",
    "--eval_steps",
    "3",
    "--eval_sequences",
    "8",
    "--warmup_steps",
    "2",
    "--learning_rate",
    "3e-3",
    "--report_to",
    "[]",
    "--progress",
    "false",
]


def accelerate_launch(
    accelerate_args: list[str], module_args: list[str], check: bool = True
) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes running ``python -m <module_args>``; fails the test on error
    (``check=False``: returns the failed process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "WORLD_SIZE", "RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_args,
        "--num_processes",
        "2",
        "--main_process_port",
        "29533",
        "-m",
        *module_args,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def launch(run: Path, cache: Path, *accelerate_args: str, extra: tuple[str, ...] = ()) -> str:
    proc = accelerate_launch(
        list(accelerate_args),
        ["training.pretrain", *COMMON, "--output_dir", str(run), "--data_cache_dir", str(cache), *extra],
    )
    assert "2 process(es)" in proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    assert main([*COMMON, "--output_dir", str(root / "single"), "--data_cache_dir", str(cache)]) == 0
    return root, cache


def compare_with_single(run: Path, single: Path, atol: float) -> None:
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol), (x["step"], x["loss"], y["loss"])
        assert x["lr"] == y["lr"] and x["tokens"] == y["tokens"]
        if "val_loss" in x:
            assert x["val_loss"] == pytest.approx(y["val_loss"], abs=atol)
    wa, wb = load_file(single / "hf" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol * 10)


def test_ddp_matches_single_process(reference):
    root, cache = reference
    launch(root / "ddp", cache, "--multi_gpu")
    assert (root / "ddp" / "checkpoints" / "checkpoint-00000006" / "model.safetensors").is_file()
    compare_with_single(root / "ddp", root / "single", atol=1e-5)


def test_deepspeed_zero3_matches_single_process_and_exports(reference, tmp_path):
    pytest.importorskip("deepspeed")
    root, cache = reference
    launch(root / "ds", cache, "--config_file", str(ACCEL / "deepspeed_zero3.yaml"))
    ckpt = root / "ds" / "checkpoints" / "checkpoint-00000006"
    assert list(ckpt.glob("pytorch_model/zero_pp_rank_1_*optim_states.pt")), "ZeRO-3 partitions per rank"
    compare_with_single(root / "ds", root / "single", atol=1e-4)
    from training.export_hf import main as export_main

    assert export_main(["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "from_zero")]) == 0
    a, b = load_file(root / "ds" / "hf" / "model.safetensors"), load_file(tmp_path / "from_zero" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_matches_single_process_resumes_and_exports(reference, tmp_path):
    root, cache = reference
    launch(root / "fsdp", cache, "--config_file", str(ACCEL / "fsdp2.yaml"))
    ckpt = root / "fsdp" / "checkpoints" / "checkpoint-00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng_state_1.pt").is_file()
    compare_with_single(root / "fsdp", root / "single", atol=1e-5)
    # resume the sharded state in a new run: steps 4..6 and the final weights match the uninterrupted run
    resumed = root / "fsdp_resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    os.symlink(ckpt, resumed / "checkpoints" / ckpt.name)
    launch(resumed, cache, "--config_file", str(ACCEL / "fsdp2.yaml"), extra=("--resume_from_checkpoint", "latest"))
    straight = read_metrics(root / "fsdp" / "metrics.jsonl")[3:]
    again = read_metrics(resumed / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in again] == [(r["step"], r["loss"]) for r in straight]
    a, b = load_file(root / "fsdp" / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from training.export_hf import main as export_main

    final = root / "fsdp" / "checkpoints" / "checkpoint-00000006"
    assert export_main(["--checkpoint", str(final), "--output_dir", str(tmp_path / "from_dcp")]) == 0
    c = load_file(tmp_path / "from_dcp" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_under_deepspeed_zero3(reference, tmp_path, lora):
    """training.finetune (Trainer) launched with the same DeepSpeed config, two CPU processes: trains, evaluates
    on both ranks (ZeRO-3 gathers the sharded parameters for the forward) and both processes exit cleanly. With
    LoRA, rank 0 alone merges the saved adapters into the base model, outside ZeRO-3's partitioning (inside it,
    loading the base model waited for the other rank forever)."""
    pytest.importorskip("deepspeed")
    root, _ = reference
    hf = root / "single" / "hf"
    records = (REPO_ROOT / "training/data/instructions.jsonl").read_text().splitlines()
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(records[:24]) + "\n")
    out = tmp_path / "sft"
    accelerate_launch(
        ["--config_file", str(ACCEL / "deepspeed_zero3.yaml")],
        [
            "training.finetune",
            "--model_name_or_path",
            str(hf),
            "--data_files",
            str(REPO_ROOT / "training/data/instructions.jsonl"),
            "--eval_files",
            str(held_out),
            "--per_device_eval_batch_size",
            "4",
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--prompt_template",
            "plain",
            "--logging_steps",
            "1",
            "--use_lora",
            str(lora).lower(),
        ],
    )
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(x == x and x > 0 for x in losses)
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] > 0 and math.isclose(results["eval_ppl"], math.exp(results["eval_loss"]), rel_tol=1e-6)
    if not lora:
        assert (out / "model.safetensors").is_file()
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = load_file(out / "adapter_model.safetensors")  # gathered from the ZeRO-3 shards: full shapes
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items())  # trained
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32)
        expected = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True, dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_fsdp2_bf16_with_selective_checkpointing(reference, tmp_path):
    """bf16 parameters (FSDP2 MixedPrecisionPolicy, fp32 reduction) with selective activation checkpointing."""
    root, cache = reference
    launch(
        tmp_path / "fsdp_bf16",
        cache,
        "--config_file",
        str(ACCEL / "fsdp2.yaml"),
        extra=("--bf16", "true", "--activation_checkpointing", "selective", "--eval_steps", "0"),
    )
    single = read_metrics(root / "single" / "metrics.jsonl")
    mixed = read_metrics(tmp_path / "fsdp_bf16" / "metrics.jsonl")
    assert [r["step"] for r in mixed] == [r["step"] for r in single]
    for a, b in zip(single, mixed):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)  # bf16 rounding, same data and updates


def test_fsdp2_with_regional_compile(reference, tmp_path):
    """compile: true under FSDP2 (fully_shard per layer, then torch.compile of each layer's forward, so FSDP2's
    hooks stay outside the compiled region) with selective checkpointing trains the single-process model."""
    root, cache = reference
    run = tmp_path / "fsdp_compiled"
    log = launch(
        run,
        cache,
        "--config_file",
        str(ACCEL / "fsdp2.yaml"),
        extra=("--compile", "true", "--activation_checkpointing", "selective"),
    )
    # FSDP2 swaps each layer's class for FSDPLlamaDecoderLayer: the layers must still be found and compiled
    assert "fsdp2, 2 process(es)" in log and "compiled 2 decoder layers" in log, log[-2000:]
    compare_with_single(run, root / "single", atol=1e-4)


def test_compile_with_deepspeed_is_refused(reference, tmp_path):
    pytest.importorskip("deepspeed")
    root, cache = reference
    run = tmp_path / "ds_compiled"
    proc = accelerate_launch(
        ["--config_file", str(ACCEL / "deepspeed_zero3.yaml")],
        ["training.pretrain", *COMMON, "--output_dir", str(run), "--data_cache_dir", str(cache), "--compile", "true"],
        check=False,
    )
    assert proc.returncode != 0
    assert "error: compile is not supported with DeepSpeed" in proc.stderr and "parallelism: fsdp2" in proc.stderr
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
