"""Instruction finetuning: loss masking, EOS learned, packing without cross-contamination, LoRA/QLoRA, merge,
Trainer resume, push_to_hub, TRL's SFTTrainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FakeHub
from safetensors.torch import load_file

from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
from training.finetune import main
from training.instruct_data import TEMPLATES, SFTCollator, generate_instructions, tokenize_example

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained_tokenizer_dir):
    """A tiny randomly initialised base model + the tokenizer trained in the session, as a Hub folder."""
    folder = tmp_path_factory.mktemp("base")
    tok = LlamaTokenizerFast.from_pretrained(trained_tokenizer_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_preset("tiny", vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = folder / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_instructions(40, seed=1)))
    return folder, tok, data


COMMON = [
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "5",
    "--save_strategy",
    "no",
    "--prompt_template",
    "plain",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
]


def run(base_folder: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        ["--model_name_or_path", str(base_folder), "--data_files", str(data), "--output_dir", str(out), *COMMON, *extra]
    )


def test_prompt_tokens_carry_no_loss_and_eos_is_a_label(base):
    _, tok, _ = base
    prompt, response = TEMPLATES["alpaca"].format(
        {"instruction": "Give the opposite.", "input": "hot", "output": "cold"}
    )
    assert prompt.endswith("### Input:\nhot\n\n### Response:\n") and response == "cold"
    ex = tokenize_example(tok, prompt, response, 512)
    full = tok(prompt + response)["input_ids"]
    assert ex["input_ids"] == full + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == "cold"
    assert tokenize_example(tok, prompt, response, n_prompt) is None  # no room for the response: dropped
    batch = SFTCollator(tok.pad_token_id)([ex, tokenize_example(tok, "Q\n", "A", 512)])
    assert tok.pad_token_id == 0 != tok.eos_token_id
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["labels"][pad] == -100).all()
    assert (batch["labels"] == tok.eos_token_id).sum() == 2  # each row's EOS is trained, padding never is


def test_packing_scores_each_example_as_if_alone(base):
    from transformers import DataCollatorWithFlattening

    folder, tok, data = base
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    records = [json.loads(line) for line in data.read_text().splitlines()[:5]]
    examples = [tokenize_example(tok, *TEMPLATES["plain"].format(r), 256) for r in records]

    def nll(logits, labels):
        shift_logits, shift_labels = logits[:-1], torch.tensor(labels[1:])
        return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")

    alone = []
    with torch.no_grad():
        for ex in examples:
            alone.append(nll(model(torch.tensor([ex["input_ids"]])).logits[0], ex["labels"]))
        packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(examples)
        assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    start = 0
    for ex, ref in zip(examples, alone):
        n = len(ex["input_ids"])
        labels = packed["labels"][0, start : start + n].tolist()
        assert labels[0] == -100 and labels[1:] == ex["labels"][1:]
        torch.testing.assert_close(nll(logits[start : start + n], ex["labels"]), ref, rtol=1e-5, atol=1e-5)
        start += n
    # whole-batch mean loss through the model's own loss: packed == padded
    with torch.no_grad():
        padded = SFTCollator(tok.pad_token_id)(examples)
        loss_padded = model(**padded).loss
        loss_packed = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"]
        ).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)


def _history(out: Path) -> list[float]:
    state = json.loads((out / "all_results.json").read_text())
    return state


def test_full_finetune_learns_to_answer_and_stop(base, tmp_path):
    folder, tok, data = base
    out = tmp_path / "sft"
    assert (
        run(
            folder,
            data,
            out,
            "--max_steps",
            "120",
            "--learning_rate",
            "3e-3",
            "--warmup_steps",
            "5",
            "--packing",
            "true",
            "--eval_files",
            str(data),
        )
        == 0
    )
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] < 1.0, results  # the 40 answers are learned (random init starts at ~6.9)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    stopped = 0
    records = [json.loads(line) for line in data.read_text().splitlines()[:10]]
    for r in records:
        prompt, _ = TEMPLATES["plain"].format(r)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
        stopped += tok.eos_token_id in gen
    assert stopped >= 9, f"only {stopped}/10 answers ended with EOS"


def test_lora_adapters_merge_to_the_same_logits(base, tmp_path):
    from peft import PeftModel

    folder, tok, data = base
    out = tmp_path / "lora"
    assert (
        run(
            folder,
            data,
            out,
            "--max_steps",
            "10",
            "--learning_rate",
            "1e-2",
            "--use_lora",
            "true",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
        )
        == 0
    )
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        and cfg["r"] == 4
    )
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    with_adapter = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), str(out)).eval()
    merged = LlamaForCausalLM.from_pretrained(out / "merged").eval()
    base_model = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = tok(["What is 3 plus 4?", "Reverse the letters"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b, c = with_adapter(**ids).logits, merged(**ids).logits, base_model(**ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-3, "the adapters changed nothing"


def test_qlora_on_a_4bit_base(base, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder, tok, data = base
    out = tmp_path / "qlora"
    assert (
        run(folder, data, out, "--max_steps", "3", "--learning_rate", "1e-3", "--qlora", "true", "--lora_r", "4") == 0
    )
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    merged = load_file(out / "merged" / "model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # merged into full precision


def test_trainer_checkpoint_resume(base, tmp_path):
    import shutil

    folder, tok, data = base
    args = ["--max_steps", "6", "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "3"]
    assert run(folder, data, tmp_path / "a", *args) == 0
    # a second run that starts from the first one's step-3 checkpoint (as after an interruption) ...
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    assert (
        run(folder, data, tmp_path / "b", *args, "--resume_from_checkpoint", str(tmp_path / "b" / "checkpoint-3")) == 0
    )
    # ... ends with the same weights as the uninterrupted run
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_push_to_hub_and_config_file(base, tmp_path, monkeypatch, capsys):
    folder, tok, data = base
    hub = FakeHub.install(monkeypatch)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model_name_or_path: {folder}\ndata_files: [{data}]\nmax_steps: 2\nlearning_rate: 1.0e-3\n"
        "use_lora: true\nlora_r: 2\n"
    )
    out = tmp_path / "pushed"
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--output_dir",
                str(out),
                "--max_steps",
                "3",
                *COMMON,
                "--push_to_hub",
                "true",
                "--hub_model_id",
                "me/tiny-sft",
            ]
        )
        == 0
    )
    sent = {name for repo, name in hub.files if repo == "me/tiny-sft"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "modeling_llama.py"} <= sent
    assert json.loads((out / "trainer_state.json").read_text())["max_steps"] == 3  # CLI beat the file's 2
    cfg.write_text("learning_rat: 1.0\n")
    assert main(["--config", str(cfg), "--output_dir", str(out)]) == 2
    assert "unknown argument(s) ['learning_rat']" in capsys.readouterr().err


def test_bad_data_fails_clearly(base, tmp_path, capsys):
    folder, tok, _ = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"question": "no"}\n')
    assert run(folder, bad, tmp_path / "o", "--max_steps", "1") == 2
    assert "bad.jsonl:2: expected instruction/input/output or prompt/response fields" in capsys.readouterr().err
    assert run(folder, tmp_path / "missing.jsonl", tmp_path / "o", "--max_steps", "1") == 2
    assert "missing.jsonl: data file not found" in capsys.readouterr().err


def test_trl_sft_trainer_runs_our_model(base, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    folder, tok, data = base
    records = [json.loads(line) for line in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": TEMPLATES["plain"].format(r)[0], "completion": r["output"]} for r in records])
    model = LlamaForCausalLM.from_pretrained(folder)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
        save_strategy="no",
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [
        trainer.state.log_history[-1]["train_loss"]
    ]
    assert all(math.isfinite(x) and x > 0 for x in losses)
