"""Pretraining with the LLaMA paper's recipe, on Accelerate (single process, DDP, DeepSpeed ZeRO-3) or FSDP2.

    python -m training.pretrain --config training/configs/tiny.yaml [--max_steps 50 ...]
    accelerate launch --config_file training/configs/accelerate/deepspeed_zero3.yaml -m training.pretrain --config ...

Shape: ``setup()`` builds everything from the config (tokenizer, prepared data, model, parallelism, optimizer,
schedule, resume), ``fit()`` runs the optimizer steps (logging, validation, checkpoints, non-finite guard), then
the final model is exported as a Hub folder and, if asked, sampled through ``pipeline()``.

Parallelism is chosen by how the script is launched: ``accelerate launch`` with a DeepSpeed config gives ZeRO-3,
with several processes and no DeepSpeed/FSDP config gives DDP, and ``parallelism: fsdp2`` (or an accelerate
config with FSDP version 2) shards every decoder layer with ``torch.distributed.fsdp.fully_shard`` from
``training.parallel`` (on GPUs and on CPU/gloo alike).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training import malloc_keep, mkl_amd
from training.config import ConfigError, config_to_dict, dump_yaml, parse_config

__all__ = ["PretrainConfig", "resolve_batch", "setup", "fit", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - the name mirrors argparse
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class PretrainConfig:
    """Pretraining of a LLaMA model with the paper's recipe (AdamW β=(0.9, 0.95), weight decay 0.1, clipping 1.0,
    2000 warmup steps, cosine decay to 10% of the peak learning rate)."""

    # --- run
    output_dir: str = _f("runs/pretrain", "run folder: config.yaml, metrics.jsonl, checkpoints/, hf/")
    overwrite_output_dir: bool = _f(False, "start afresh even if output_dir holds checkpoints")
    seed: int = _f(42, "seed of model init and data order")
    # --- model
    model_preset: str = _f("tiny", "architecture preset: tiny, small, 100M, 1B, 7B, 13B, 33B (30B), 65B")
    model_config: dict = _f({}, 'overrides of LlamaConfig fields, e.g. {"num_hidden_layers": 4}')
    init_from: str | None = _f(None, "start from the weights of this Hub folder instead of a random init")
    attn_implementation: str = _f(
        "auto",
        "attention kernel: sdpa (memory-efficient / flash), blocked_causal (exact, skips masked blocks; fastest on "
        "CPU), eager, flash_attention_2; auto: blocked_causal on CPU, sdpa on GPUs",
    )
    # --- tokenizer and data
    tokenizer: str | None = _f(None, "tokenizer folder or tokenizer.model; None: train one (tokenizer_train)")
    tokenizer_train: dict = _f(
        {"inputs": ["embedded:shakespeare"], "vocab_size": 4096},
        "when tokenizer is None: train a BPE with the paper's settings on these inputs",
    )
    data_sources: list = _f(
        [{"name": "shakespeare", "inputs": ["embedded:shakespeare"], "weight": 1.0}],
        "list of {name, weight, and either path (a prepared folder) or inputs (raw files, "
        "prepared into data_cache_dir on first use), text_key}",
    )
    data_cache_dir: str = _f("data_cache", "where tokenizers and prepared data built on first use are kept")
    seq_length: int = _f(2048, "context length of training sequences (the paper: 2048)")
    validation_fraction: float = _f(0.005, "fraction of every source held out for validation")
    # --- batch
    per_device_train_batch_size: int = _f(1, "sequences per micro-batch on each process")
    gradient_accumulation_steps: int | None = _f(
        None, "micro-batches per optimizer step; None: derived from global_batch_tokens"
    )
    global_batch_tokens: int | None = _f(
        None,
        "tokens per optimizer step across all processes (the paper: 4M = "
        "2048 x 2048); checked against micro-batch x accumulation x world",
    )
    # --- optimisation
    max_steps: int = _f(1000, "optimizer steps")
    learning_rate: float = _f(3.0e-4, "peak learning rate (Table 2: 3e-4 for 7B/13B, 1.5e-4 for 33B/65B)")
    warmup_steps: int = _f(2000, "linear warmup steps (the paper: 2000)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak (the paper: 10%)")
    lr_scheduler_type: str = _f("cosine", "cosine (to min_lr_ratio at the last step) or constant after warmup")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices (not on norm weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    optim_implementation: str = _f("auto", "AdamW kernel: auto (fused on CPU/CUDA, else foreach), fused, foreach")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    bf16: bool | None = _f(None, "bf16 mixed precision; None: on for CUDA, off (fp32) on CPU")
    activation_checkpointing: str = _f(
        "none",
        "none, full (per decoder layer) or selective (save matmul and attention outputs, recompute element-wise ops)",
    )
    parallelism: str = _f("auto", "auto (what accelerate launch configured: single, DDP, DeepSpeed) or fsdp2")
    compile: bool = _f(
        False,
        "torch.compile every decoder layer (regional compilation: one graph for all layers) and the loss; "
        "1.6x tokens/s for the 1B preset on an H100 (benchmarks/RESULTS.md); not with DeepSpeed",
    )
    fused_loss: bool | None = _f(
        None,
        "compute the loss fused with the LM head, chunk by chunk, without the (B, T, V) logits (same loss and "
        "gradients, less memory); None: on for CPU (faster there), off on CUDA (the compiled loss)",
    )
    max_consecutive_nonfinite: int = _f(5, "abort after this many steps in a row with non-finite loss/gradients")
    # --- logging, evaluation, checkpoints
    logging_steps: int = _f(10, "write metrics every N steps (metrics.jsonl gets every step)")
    eval_steps: int = _f(200, "validation every N steps (0: only at the end)")
    eval_sequences: int = _f(64, "held-out sequences per validation pass (split across processes)")
    save_steps: int = _f(500, "checkpoint every N steps (and at the end)")
    save_total_limit: int | None = _f(3, "keep this many checkpoints")
    resume_from_checkpoint: str | None = _f(None, "a checkpoint folder, or latest")
    report_to: list = _f(["tensorboard"], "accelerate trackers (tensorboard, wandb ...); [] for none")
    peak_flops: float | None = _f(None, "peak FLOP/s of one device for MFU (default: known GPUs; none on CPU)")
    export_hf: bool = _f(True, "write the final model as a Hub folder to OUTPUT_DIR/hf")
    sample_prompts: list = _f([], "prompts to complete with pipeline() from the exported folder at the end")
    sample_max_new_tokens: int = _f(40, "tokens per sample")
    progress: bool = _f(True, "show a progress bar")
    debug_nan_steps: list = _f([], "testing aid: make the loss non-finite at these steps")

    def validate(self) -> None:
        from training.parallel import AC_MODES

        checks = [
            (self.activation_checkpointing in AC_MODES, f"activation_checkpointing must be one of {AC_MODES}"),
            (self.parallelism in ("auto", "fsdp2"), "parallelism must be auto or fsdp2"),
            (
                not (self.compile and self.attn_implementation == "eager"),
                "compile needs attn_implementation auto, sdpa, blocked_causal or flash_attention_2, not eager",
            ),
            (self.lr_scheduler_type in ("cosine", "constant"), "lr_scheduler_type must be cosine or constant"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.seq_length >= 2, "seq_length must be >= 2"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.save_steps >= 1 and self.logging_steps >= 1, "save_steps and logging_steps must be >= 1"),
            (self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite must be >= 1"),
            (self.eval_sequences >= 1, "eval_sequences must be >= 1"),
            (isinstance(self.data_sources, list) and len(self.data_sources) > 0, "data_sources must be a list"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for k, src in enumerate(self.data_sources):
            if not isinstance(src, dict) or "name" not in src or not ("path" in src or "inputs" in src):
                raise ConfigError(f"data_sources[{k}] needs a name and either path or inputs, got {src!r}")
            if float(src.get("weight", 1.0)) <= 0:
                raise ConfigError(f"data_sources[{k}] ({src['name']}): weight must be > 0")


def resolve_batch(cfg: PretrainConfig, world: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, sequences per optimizer step), checked against ``global_batch_tokens``."""
    micro = cfg.per_device_train_batch_size
    if cfg.global_batch_tokens is None:
        accum = cfg.gradient_accumulation_steps or 1
        return micro, accum, micro * accum * world
    if cfg.global_batch_tokens % cfg.seq_length:
        raise ConfigError(
            f"global_batch_tokens {cfg.global_batch_tokens:,} is not a multiple of seq_length {cfg.seq_length}"
        )
    seqs = cfg.global_batch_tokens // cfg.seq_length
    per_step = micro * world
    if cfg.gradient_accumulation_steps is None:
        if seqs % per_step:
            raise ConfigError(
                f"a global batch of {seqs:,} sequences ({cfg.global_batch_tokens:,} tokens / {cfg.seq_length}) "
                f"cannot be split into micro-batches of {micro} on {world} process(es): {seqs} is not divisible "
                f"by {per_step}. Change per_device_train_batch_size or the number of processes."
            )
        return micro, seqs // per_step, seqs
    if micro * cfg.gradient_accumulation_steps * world != seqs:
        raise ConfigError(
            f"per_device_train_batch_size {micro} x gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
            f"x world size {world} = {micro * cfg.gradient_accumulation_steps * world} sequences, but "
            f"global_batch_tokens asks for {seqs} ({cfg.global_batch_tokens:,} tokens); leave "
            "gradient_accumulation_steps unset to derive it"
        )
    return micro, cfg.gradient_accumulation_steps, seqs


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


@dataclasses.dataclass
class Trainer:
    cfg: PretrainConfig
    accelerator: Any
    tokenizer: Any
    model: Any
    model_config: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    val_sources: list
    manager: Any
    metrics: Any
    state: TrainState
    mode: str  # "accelerate", "deepspeed" or "fsdp2"
    micro: int
    accum: int
    flops_per_token: float
    peak_flops: float | None
    run_dir: Path
    loss_fn: Any = None  # (logits, targets) -> mean cross-entropy, compiled with cfg.compile; None: fused loss


# ------------------------------------------------------------------------------------------------ setup
def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _on_main_first(accelerator, fn):
    """Run ``fn`` on the main process, then on the others (which then find its cached result)."""
    if accelerator.is_main_process:
        result = fn()
        accelerator.wait_for_everyone()
        return result
    accelerator.wait_for_everyone()
    return fn()


def build_tokenizer(cfg: PretrainConfig, accelerator):
    from modeling_llama import LlamaTokenizerFast
    from training.train_tokenizer import train_tokenizer

    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if path.is_dir():
            return LlamaTokenizerFast.from_pretrained(path)
        if path.is_file():
            return LlamaTokenizerFast(vocab_file=str(path))
        raise ConfigError(f"tokenizer {path} not found (a tokenizer folder or a tokenizer.model file)")
    spec = dict(cfg.tokenizer_train)
    inputs = spec.pop("inputs", None)
    vocab = int(spec.pop("vocab_size", 32000))
    if not inputs:
        raise ConfigError("tokenizer is None and tokenizer_train has no inputs")
    folder = Path(cfg.data_cache_dir) / f"tokenizer-{vocab}-{_hash(inputs, vocab, spec)}"

    def make():
        if not (folder / "tokenizer.json").is_file():
            train_tokenizer(inputs, folder, vocab_size=vocab, seed=cfg.seed, **spec)
        return LlamaTokenizerFast.from_pretrained(folder)

    return _on_main_first(accelerator, make)


def build_sources(cfg: PretrainConfig, tokenizer, accelerator) -> list:
    from training.data import TokenStream, prepare_data, tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    streams = []
    for src in cfg.data_sources:
        if "path" in src:
            folder = Path(src["path"])
        else:
            folder = Path(cfg.data_cache_dir) / f"{src['name']}-{fingerprint}-{_hash(src['inputs'])}"

            def make(src=src, folder=folder):
                prepare_data(
                    src["inputs"], folder, tokenizer, text_key=src.get("text_key", "text"), progress=cfg.progress
                )

            _on_main_first(accelerator, make)
        streams.append((src["name"], TokenStream(folder, expected_tokenizer=fingerprint), float(src.get("weight", 1))))
    return streams


def resolve_attn_implementation(name: str, cuda: bool) -> str:
    """``auto`` -> ``sdpa`` (flash / memory-efficient kernels) on GPUs, ``blocked_causal`` on CPU, where it beats
    SDPA's flash kernel by skipping the masked blocks in plain matrix products (benchmarks/RESULTS.md)."""
    if name != "auto":
        return name
    return "sdpa" if cuda else "blocked_causal"


def build_model(cfg: PretrainConfig, tokenizer, cuda: bool = False):
    from modeling_llama import LlamaConfig, LlamaForCausalLM

    attn_implementation = resolve_attn_implementation(cfg.attn_implementation, cuda)
    if cfg.init_from:
        model = LlamaForCausalLM.from_pretrained(
            cfg.init_from, dtype=torch.float32, attn_implementation=attn_implementation
        )
        if model.config.vocab_size != len(tokenizer):
            raise ConfigError(
                f"init_from model has vocab_size {model.config.vocab_size} but the tokenizer has "
                f"{len(tokenizer)} tokens"
            )
        return model
    overrides = {"vocab_size": len(tokenizer), "max_position_embeddings": max(cfg.seq_length, 2048), **cfg.model_config}
    try:
        config = LlamaConfig.from_preset(cfg.model_preset, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if config.max_position_embeddings < cfg.seq_length:
        raise ConfigError(
            f"seq_length {cfg.seq_length} exceeds max_position_embeddings {config.max_position_embeddings}"
        )
    config._attn_implementation = attn_implementation
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model


def setup(cfg: PretrainConfig) -> Trainer:
    from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    from training.checkpoint import CheckpointManager
    from training.data import PackedMixture, PretrainLoader, split_sources
    from training.metrics import MetricsWriter, flops_per_token, peak_flops_for_device
    from training.optim import build_optimizer, build_scheduler
    from training.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp2

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    fused_loss = cfg.fused_loss if cfg.fused_loss is not None else not cuda
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum, seqs_per_step = resolve_batch(cfg, world)
    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if env_fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the accelerate config asks for FSDP version 1; this trainer uses FSDP2 (fsdp_version: 2)")
    use_fsdp2 = cfg.parallelism == "fsdp2" or env_fsdp
    # DeepSpeed runs on CPU through its own CPU accelerator; accelerate must not be put in cpu mode for it.
    env_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    report_to = [r for r in cfg.report_to if r != "none"]
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to.remove("tensorboard")
    run_dir = Path(cfg.output_dir)
    # A run started in a process that already used Accelerate (a notebook, a Trainer, a test) must not inherit
    # its mixed-precision/plugin state; the process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not cuda and not env_deepspeed,
        mixed_precision="bf16" if bf16 and not use_fsdp2 else "no",
        gradient_accumulation_steps=accum,
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if world > 1 and not cuda else [],
    )
    if accelerator.num_processes != world:
        raise ConfigError(f"WORLD_SIZE says {world} processes but accelerate started {accelerator.num_processes}")
    mode = (
        "fsdp2"
        if use_fsdp2
        else "deepspeed"
        if accelerator.distributed_type == DistributedType.DEEPSPEED
        else "accelerate"
    )

    manager = CheckpointManager(run_dir, keep=cfg.save_total_limit)
    resume = manager.resolve(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    if resume is None and manager.complete() and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume_from_checkpoint latest to continue "
            "or --overwrite_output_dir true to start again"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config_to_dict(cfg), run_dir / "config.yaml")

    tokenizer = build_tokenizer(cfg, accelerator)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    streams = build_sources(cfg, tokenizer, accelerator)
    train_sources, val_sources = split_sources(streams, cfg.seq_length, cfg.validation_fraction)
    mixture = PackedMixture(train_sources, cfg.seq_length, cfg.seed)
    loader = PretrainLoader(mixture, micro, accum, accelerator.num_processes, accelerator.process_index)

    model = build_model(cfg, tokenizer, cuda)
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(
        n_params,
        model.model.embed_tokens.weight.numel(),
        model_config.num_hidden_layers,
        model_config.hidden_size,
        cfg.seq_length,
    )
    peak = cfg.peak_flops or (peak_flops_for_device(torch.cuda.get_device_name()) if cuda else None)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    model.config.use_cache = False
    model.train()

    optim_kwargs = dict(
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        implementation=cfg.optim_implementation,
    )
    if mode == "fsdp2":
        model.to(accelerator.device)
        apply_fsdp2(model, param_dtype=torch.bfloat16 if bf16 else None)
        if cfg.compile:
            apply_compile(model)  # after fully_shard: its hooks stay outside the compiled forward
        optimizer = build_optimizer(model, **optim_kwargs)
    else:
        model.to(accelerator.device)
        if cfg.compile:
            if mode == "deepspeed":
                raise ConfigError(
                    "compile is not supported with DeepSpeed here (ZeRO-3 gathers parameters in hooks that "
                    "torch.compile would have to trace); use parallelism: fsdp2 or set compile: false"
                )
            apply_compile(model)
        optimizer = build_optimizer(model, **optim_kwargs)
        if mode == "deepspeed":
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = micro
            ds["gradient_accumulation_steps"] = accum
            ds["train_batch_size"] = micro * accum * accelerator.num_processes
            ds["gradient_clipping"] = cfg.max_grad_norm
            ds["zero_allow_untested_optimizer"] = True
        model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.lr_scheduler_type)

    if accelerator.device.type == "cpu":
        malloc_keep.keep_freed_memory()  # every step reuses the last one's pages instead of faulting in new ones

    state = TrainState()
    trainer = Trainer(
        cfg,
        accelerator,
        tokenizer,
        model,
        model_config,
        optimizer,
        scheduler,
        loader,
        val_sources,
        manager,
        None,
        state,
        mode,
        micro,
        accum,
        fpt,
        peak,
        run_dir,
        None if fused_loss else torch.compile(cross_entropy) if cfg.compile else cross_entropy,
    )
    if resume is not None:
        load_checkpoint(trainer, resume)
    trainer.metrics = MetricsWriter(
        run_dir / "metrics.jsonl",
        resume_step=trainer.state.step if resume else None,
        enabled=accelerator.is_main_process,
    )
    if report_to:
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in config_to_dict(cfg).items()
            if v is not None
        }
        accelerator.init_trackers("pretrain", config=flat)
    n_compiled = sum(bool(getattr(m, "_regionally_compiled", False)) for m in model.modules())
    if accelerator.is_main_process:
        _log(
            accelerator,
            f"model: {n_params / 1e6:.1f}M parameters ({cfg.model_preset}), {mode}, "
            f"{accelerator.num_processes} process(es), micro-batch {micro} x accumulation {accum} x "
            f"world {accelerator.num_processes} = {seqs_per_step} sequences of {cfg.seq_length} "
            f"tokens per step, {'bf16' if bf16 else 'fp32'}, activation checkpointing "
            f"{cfg.activation_checkpointing}, attention {model_config._attn_implementation}, "
            f"{'fused' if fused_loss else 'separate'} LM head + loss"
            + (f", compiled {n_compiled} decoder layers" if cfg.compile else "")
            + (
                f", MKL on AMD: {mkl_amd.state()}"
                if accelerator.device.type == "cpu" and mkl_amd.cpu_vendor() == "AuthenticAMD"
                else ""
            )
            + (f", malloc keeps freed memory: {malloc_keep.state()}" if accelerator.device.type == "cpu" else "")
            + (f"; resumed from {resume} at step {trainer.state.step}" if resume else ""),
        )
    return trainer


def _log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(t: Trainer) -> Path:
    acc = t.accelerator
    step = t.state.step
    tmp = t.manager.tmp_path(step)
    if acc.is_main_process:
        t.manager.prepare(step)
    acc.wait_for_everyone()
    if t.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from training.checkpoint import rng_state

        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        torch.save(rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    else:
        acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(
            {
                "scheduler": t.scheduler.state_dict(),
                "data": t.loader.state_dict(),
                "trainer": dataclasses.asdict(t.state),
            },
            tmp / "extra_state.pt",
        )
        (tmp / "checkpoint_info.json").write_text(
            json.dumps({"kind": t.mode, "step": step, "world_size": acc.num_processes}, indent=2)
        )
        t.manager.publish(step)
    acc.wait_for_everyone()
    return t.manager.path(step)


def load_checkpoint(t: Trainer, path: Path) -> None:
    acc = t.accelerator
    info = json.loads((path / "checkpoint_info.json").read_text())
    if info["kind"] != t.mode:
        raise ConfigError(f"{path} was written by a {info['kind']} run; this run is {t.mode}")
    if t.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from training.checkpoint import set_rng_state

        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(t.model, t.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_state_{acc.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        acc.load_state(str(path))
    extra = torch.load(path / "extra_state.pt", weights_only=False)
    t.scheduler.load_state_dict(extra["scheduler"])
    t.loader.load_state_dict(extra["data"])
    t.state = TrainState(**extra["trainer"])


# ------------------------------------------------------------------------------------------------ training
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) targets, computed in float32.

    Compiled (``compile: true``), inductor fuses the upcast into the log-softmax, so the float32 copy of the
    logits (B x T x V x 4 bytes: 2 GB for 8 x 2048 x 32000) is never materialised.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _loss(model, batch: torch.Tensor, loss_fn=cross_entropy) -> torch.Tensor:
    """Mean next-token cross-entropy of a packed (B, T+1) batch: inputs [:, :-1], targets [:, 1:]. With no
    ``loss_fn``, the model computes it fused with its LM head (``return_logits=False``), never making logits."""
    if loss_fn is None:
        return model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:], return_logits=False, use_cache=False).loss
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (B, T, V)
    return loss_fn(logits, batch[:, 1:])


def evaluate(t: Trainer) -> dict[str, float]:
    """Validation loss and perplexity on a fixed sample of the held-out split (same for every call)."""
    from training.data import PackedMixture

    if not t.val_sources:
        return {}
    acc = t.accelerator
    mixture = PackedMixture(t.val_sources, t.cfg.seq_length, t.cfg.seed + 1)
    world, rank = acc.num_processes, acc.process_index
    was_training = t.model.training
    t.model.eval()
    total = torch.zeros(2, device=acc.device, dtype=torch.float64)
    draws = [mixture.next_draw() for _ in range(t.cfg.eval_sequences)]
    mine = draws[rank::world]  # the same sequences whatever the number of processes
    # Sharded models need every rank in every forward: all ranks run the same number of batches, padding with a
    # repeated sequence that carries no weight.
    n_batches = math.ceil(math.ceil(len(draws) / world) / t.micro)
    with torch.no_grad():
        for k in range(n_batches):
            chunk = mine[k * t.micro : (k + 1) * t.micro]
            weight = len(chunk)
            chunk = chunk + [draws[0]] * (t.micro - len(chunk))
            batch = torch.from_numpy(np.stack([mixture.read(*d) for d in chunk])).to(acc.device)
            logits = t.model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            losses = losses.view(batch.shape[0], -1)[:weight]
            total[0] += losses.double().sum()
            total[1] += losses.numel()
    total = acc.reduce(total, reduction="sum")
    if was_training:
        t.model.train()
    loss = (total[0] / total[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _clip(t: Trainer) -> float | None:
    params = [p for p in t.model.parameters() if p.grad is not None]
    if t.mode == "fsdp2":
        norm = torch.nn.utils.clip_grad_norm_(params, t.cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)
    if t.mode == "deepspeed":
        engine = t.model
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        return float(norm) if norm is not None else None
    return float(t.accelerator.clip_grad_norm_(t.model.parameters(), t.cfg.max_grad_norm))


def train_step(t: Trainer, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; skips the update if anything is non-finite."""
    acc, cfg = t.accelerator, t.cfg
    step = t.state.step + 1
    losses = []
    inject = step in set(cfg.debug_nan_steps)
    for a, batch in enumerate(micro_batches):
        batch = batch.to(acc.device, non_blocking=True)
        last = a == len(micro_batches) - 1
        if t.mode == "fsdp2":
            t.model.set_requires_gradient_sync(last)
            loss = _loss(t.model, batch, t.loss_fn)
            if inject:
                loss = loss * float("nan")
            (loss / len(micro_batches)).backward()
        else:
            with acc.accumulate(t.model):
                loss = _loss(t.model, batch, t.loss_fn)
                if inject:
                    loss = loss * float("nan")
                if t.mode == "deepspeed" and last:
                    # DeepSpeed steps inside this backward: refuse to apply a non-finite update at all.
                    flag = torch.stack(losses + [loss.detach()]).isfinite().all().float()[None]
                    if acc.gather(flag).min().item() < 1:
                        raise NonFiniteError(
                            f"non-finite loss at step {step} under DeepSpeed; the update was not applied and the "
                            f"last checkpoint ({t.manager.latest()}) is intact"
                        )
                acc.backward(loss)
        losses.append(loss.detach())
    mean_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
    grad_norm = _clip(t)
    finite = math.isfinite(mean_loss) and (grad_norm is None or math.isfinite(grad_norm))
    if not finite and t.mode == "deepspeed":
        # the engine already stepped inside backward: the parameters can no longer be trusted
        raise NonFiniteError(
            f"non-finite gradient norm at step {step} under DeepSpeed, whose engine applies the update inside "
            f"backward; resume from the last checkpoint ({t.manager.latest()}) with a lower learning_rate"
        )
    lr = t.scheduler.get_last_lr()[0]
    if finite:
        t.optimizer.step()
        t.state.consecutive_nonfinite = 0
    else:
        t.state.skipped_steps += 1
        t.state.consecutive_nonfinite += 1
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    t.state.step = step
    t.state.tokens += t.loader.sequences_per_step * cfg.seq_length
    return {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "skipped": not finite}


def fit(t: Trainer) -> None:
    from tqdm.auto import tqdm

    acc, cfg = t.accelerator, t.cfg
    bar = tqdm(
        total=cfg.max_steps,
        initial=t.state.step,
        desc="pretraining",
        unit="step",
        disable=not (cfg.progress and acc.is_main_process),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    first_nonfinite = None
    while t.state.step < cfg.max_steps:
        t0 = time.perf_counter()
        micro_batches = t.loader.next_step()
        record = train_step(t, micro_batches)
        dt = time.perf_counter() - t0
        tokens_step = t.loader.sequences_per_step * cfg.seq_length
        record.update(
            tokens=t.state.tokens, tokens_per_s=tokens_step / dt, step_time_s=dt, skipped_total=t.state.skipped_steps
        )
        record["mfu"] = (
            record["tokens_per_s"] * t.flops_per_token / (t.peak_flops * acc.num_processes) if t.peak_flops else None
        )
        if record["skipped"]:
            first_nonfinite = first_nonfinite or record["step"]
            _log(
                acc,
                f"step {record['step']}: non-finite loss or gradients, update skipped "
                f"({t.state.consecutive_nonfinite} in a row, {t.state.skipped_steps} in total)",
            )
            if t.state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                t.metrics.write(record)
                raise NonFiniteError(
                    f"{t.state.consecutive_nonfinite} consecutive steps ({first_nonfinite}..{record['step']}) had a "
                    f"non-finite loss or gradient norm; training stopped. The last good checkpoint is "
                    f"{t.manager.latest()}; resume from it with a lower learning_rate or check the data."
                )
        else:
            first_nonfinite = None
        evaluate_now = cfg.eval_steps and record["step"] % cfg.eval_steps == 0
        if evaluate_now or record["step"] == cfg.max_steps:
            record.update(evaluate(t))
        t.metrics.write(record)
        if record["step"] % cfg.logging_steps == 0 or "val_loss" in record or record["step"] == cfg.max_steps:
            acc.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=record["step"]
            )
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:,.0f}",
            refresh=False,
        )
        bar.update(1)
        if record["step"] % cfg.save_steps == 0 or record["step"] == cfg.max_steps:
            save_checkpoint(t)
    bar.close()


# ------------------------------------------------------------------------------------------------ export
def full_state_dict(t: Trainer) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process (None elsewhere); every process must call this."""
    if t.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = t.accelerator.get_state_dict(t.model)
    return sd if t.accelerator.is_main_process else None


def save_hf_folder(state_dict: dict[str, torch.Tensor], model_config, tokenizer, out: str | Path) -> Path:
    """Write a Hub folder (our classes, code files, tokenizer, card) from a full state dict."""
    from modeling_llama import LlamaForCausalLM

    out = Path(out)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model.rotary_emb.to_empty(device="cpu")
    model._init_weights(model.model.rotary_emb)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export(t: Trainer) -> Path | None:
    sd = full_state_dict(t)
    out = None
    if t.accelerator.is_main_process:
        out = save_hf_folder(sd, t.model_config, t.tokenizer, t.run_dir / "hf")
        _log(t.accelerator, f"exported the model to {out}")
    t.accelerator.wait_for_everyone()
    return out


def print_samples(folder: Path, prompts: list[str], max_new_tokens: int) -> None:
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(folder), trust_remote_code=True, device="cpu")
    torch.manual_seed(0)
    outs = gen(
        prompts,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        batch_size=len(prompts),
        return_full_text=True,
    )
    for prompt, out in zip(prompts, outs):
        print(f"--- {prompt!r}\n{out[0]['generated_text']}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError
    from training.data import DataError

    try:
        cfg = parse_config(PretrainConfig, argv, prog="python -m training.pretrain")
        trainer = setup(cfg)
        fit(trainer)
        folder = export(trainer) if cfg.export_hf else None
        trainer.accelerator.wait_for_everyone()  # the ranks tear the process group down together (as finetune)
        trainer.accelerator.end_training()
        if folder is not None and cfg.sample_prompts and trainer.accelerator.is_main_process:
            print_samples(folder, list(cfg.sample_prompts), cfg.sample_max_new_tokens)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteError) else 3
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
