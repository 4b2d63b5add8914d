"""The paper's recipe: config precedence, batch arithmetic, LR schedule, weight-decay groups, clipping, and the
three activation-checkpointing modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_llama import LlamaForCausalLM
from training.config import ConfigError, load_yaml, parse_config
from training.optim import build_optimizer, build_scheduler, lr_at, param_groups
from training.parallel import apply_activation_checkpointing, apply_compile
from training.pretrain import PretrainConfig, resolve_batch

CONFIGS = REPO_ROOT / "training" / "configs"


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-3\nmax_steps: 7\nmodel_config: {num_hidden_layers: 3}\n")
    cfg = parse_config(PretrainConfig, ["--config", str(path), "--max_steps", "9", "--report_to", "[]"])
    assert cfg.learning_rate == 1e-3  # file
    assert cfg.max_steps == 9  # CLI beats file
    assert cfg.warmup_steps == 2000 and cfg.weight_decay == 0.1  # defaults: the paper's
    assert cfg.model_config == {"num_hidden_layers": 3} and cfg.report_to == []
    cfg = parse_config(PretrainConfig, ["--config", str(path), "--bf16", "true", "--tokenizer", "none"])
    assert cfg.bf16 is True and cfg.tokenizer is None


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['learning_rat'\]"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("max_steps: many\n")
    with pytest.raises(ConfigError, match="PretrainConfig.max_steps must be int, got 'many'"):
        parse_config(PretrainConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="activation_checkpointing must be one of"):
        parse_config(PretrainConfig, ["--activation_checkpointing", "some"])
    with pytest.raises(ConfigError, match=r"data_sources\[0\] needs a name and either path or inputs"):
        parse_config(PretrainConfig, ["--data_sources", '[{"weight": 1}]'])
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--max_steps", "x"])


def test_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, ["--help"], prog="python -m training.pretrain")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--output_dir",
        "--max_steps",
        "--save_steps",
        "--logging_steps",
        "--learning_rate",
        "--warmup_steps",
        "--weight_decay",
        "--max_grad_norm",
        "--seed",
        "--resume_from_checkpoint",
    ):
        assert flag in out


@pytest.mark.parametrize(
    ("name", "lr", "steps"),
    [("7B", 3e-4, 238419), ("13B", 3e-4, 238419), ("33B", 1.5e-4, 333786), ("65B", 1.5e-4, 333786)],
)
def test_paper_size_configs(name, lr, steps):
    cfg = parse_config(PretrainConfig, ["--config", str(CONFIGS / f"{name}.yaml")])
    assert (cfg.model_preset, cfg.learning_rate, cfg.max_steps, cfg.seq_length) == (name, lr, steps, 2048)
    assert (cfg.warmup_steps, cfg.min_lr_ratio, cfg.weight_decay, cfg.max_grad_norm) == (2000, 0.1, 0.1, 1.0)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.95, 1e-8)
    assert cfg.global_batch_tokens == 4 * 2**20
    weights = {s["name"]: s["weight"] for s in cfg.data_sources}
    assert weights == {
        "commoncrawl": 0.67,
        "c4": 0.15,
        "github": 0.045,
        "wikipedia": 0.045,
        "books": 0.045,
        "arxiv": 0.025,
        "stackexchange": 0.02,
    }
    for world in (8, 64, 256):
        micro, accum, seqs = resolve_batch(cfg, world)
        assert micro * accum * world * cfg.seq_length == 4 * 2**20 and seqs == 2048
    with pytest.raises(ConfigError, match=r"cannot be split into micro-batches of \d+ on 3 process\(es\)"):
        resolve_batch(cfg, 3)


def test_batch_arithmetic_errors():
    cfg = PretrainConfig(
        seq_length=2048, global_batch_tokens=4 * 2**20, per_device_train_batch_size=4, gradient_accumulation_steps=3
    )
    with pytest.raises(ConfigError, match=r"4 x gradient_accumulation_steps 3 x world size 8 = 96 sequences"):
        resolve_batch(cfg, 8)
    cfg = PretrainConfig(seq_length=1000, global_batch_tokens=4 * 2**20)
    with pytest.raises(ConfigError, match="is not a multiple of seq_length 1000"):
        resolve_batch(cfg, 1)
    assert resolve_batch(PretrainConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5), 2) == (3, 5, 30)


def test_learning_rate_schedule_matches_the_formula():
    peak, warmup, total = 3e-4, 2000, 238419
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=peak)
    sched = build_scheduler(opt, warmup, total, 0.1)
    factor = sched.lr_lambdas[0]  # factor(k) applies to update k + 1
    assert math.isclose(peak * factor(0), peak / warmup)  # the first update already moves
    assert math.isclose(peak * factor(warmup - 1), peak)  # end of warmup: the peak
    assert math.isclose(peak * factor(total - 1), 0.1 * peak)  # last update: 10% of the peak
    mid = warmup + (total - warmup) // 2
    assert math.isclose(peak * factor(mid - 1), peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))), rel_tol=1e-4)
    # and stepping the real scheduler gives the same numbers
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, 10, 50, 0.1)
    used = []
    for _ in range(50):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([lr_at(n, 1.0, 10, 50, 0.1) for n in range(1, 51)])
    assert used[0] == pytest.approx(0.1) and used[9] == pytest.approx(1.0) and used[-1] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_adamw_settings():
    model = LlamaForCausalLM(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert {names[id(p)].rsplit(".", 2)[-2] for p in no_decay["params"]} == {
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    } and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=3e-4)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is True  # the fused kernel on CPU too (5x faster than foreach there)
    # its update equals torch's plain for-loop AdamW over the same groups
    ref_model = LlamaForCausalLM(tiny_config())
    ref_model.load_state_dict(model.state_dict())
    ref = build_optimizer(ref_model, lr=3e-4, implementation="for-loop")
    assert not ref.defaults["fused"] and not ref.defaults["foreach"]
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            m(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_clipping_caps_the_update_norm(tmp_path, monkeypatch):
    """train_step clips to max_grad_norm before the optimizer step and reports the norm before clipping."""
    from training.pretrain import setup, train_step

    cfg = parse_config(
        PretrainConfig,
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--data_cache_dir",
            str(tmp_path / "cache"),
            "--max_grad_norm",
            "0.05",
            "--report_to",
            "[]",
            "--progress",
            "false",
            "--seq_length",
            "32",
            "--per_device_train_batch_size",
            "2",
            "--tokenizer_train",
            '{"inputs": ["embedded:shakespeare"], "vocab_size": 512}',
        ],
    )
    trainer = setup(cfg)
    seen = []
    original = trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step_and_record)
    record = train_step(trainer, trainer.loader.next_step())
    assert record["grad_norm"] > 0.05, "an untrained model's gradient is larger than the clip"
    assert seen[0] == pytest.approx(0.05, rel=1e-4)


class MatmulCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_modes_give_the_same_gradients():
    torch.manual_seed(0)
    cfg = tiny_config()
    reference = LlamaForCausalLM(cfg).state_dict()
    ids = torch.randint(0, 512, (2, 24))
    grads, backward_ops = {}, {}
    for mode in ("none", "full", "selective"):
        model = LlamaForCausalLM(cfg).train()
        model.load_state_dict(reference)
        apply_activation_checkpointing(model, mode)
        loss = model(ids, labels=ids).loss
        with MatmulCounter() as counter:
            loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        backward_ops[mode] = counter.counts
    for mode in ("full", "selective"):
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=0, atol=0)
    mm = {m: backward_ops[m].get("aten.mm.default", 0) for m in backward_ops}
    rsqrt = {m: backward_ops[m].get("aten.rsqrt.default", 0) for m in backward_ops}
    # full recomputes the layers' matmuls in backward; selective keeps them and recomputes only cheap ops
    assert mm["full"] > mm["none"] == mm["selective"]
    assert rsqrt["none"] == 0 and rsqrt["selective"] == rsqrt["full"] > 0


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_regional_compile_matches_eager_and_compiles_once(mode):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3)
    eager = LlamaForCausalLM(cfg).train()
    compiled = LlamaForCausalLM(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    for model in (eager, compiled):
        apply_activation_checkpointing(model, mode)
    apply_compile(compiled)
    apply_compile(compiled)  # idempotent
    ids = torch.randint(0, 512, (2, 24))
    for model in (eager, compiled):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] == 1  # three layers, one graph: parameters are graph inputs
    assert list(compiled.state_dict()) == names
    with pytest.raises(ValueError, match="found no decoder layer to compile"):
        apply_compile(torch.nn.Linear(2, 2))


def test_model_file_is_untouched_by_training_policies():
    text = (REPO_ROOT / "modeling_llama" / "modeling_llama.py").read_text()
    assert "create_selective_checkpoint_contexts" not in text and "fully_shard" not in text
    assert load_yaml(CONFIGS / "tiny.yaml")["model_preset"] == "tiny"
    assert Path(CONFIGS / "accelerate" / "deepspeed_zero3.json").is_file()
