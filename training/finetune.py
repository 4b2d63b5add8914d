"""Instruction finetuning (the paper's LLaMA-I, Section 5) with transformers' Trainer, optionally LoRA/QLoRA (PEFT).

    python -m training.finetune --model_name_or_path runs/shakespeare/hf \\
        --data_files training/data/instructions.jsonl --output_dir runs/sft --max_steps 200 --use_lora true
    accelerate launch --config_file training/configs/accelerate/deepspeed_zero3.yaml -m training.finetune ...

Arguments are :class:`FinetuneArguments` plus every ``transformers.TrainingArguments`` field, from ``--config
FILE.yaml`` and the command line (CLI > file > defaults). Data, templates, loss masking, padding and packing are
described in :mod:`training.instruct_data`. With LoRA the adapters are saved to ``output_dir`` and, unless
``--merge_lora false``, merged into a fresh full-precision copy of the base model exported to
``output_dir/merged``. ``--push_to_hub true --hub_model_id me/name`` uploads the final folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError, load_yaml

__all__ = ["FinetuneArguments", "parse_args", "build_datasets", "load_model", "main"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class FinetuneArguments:
    model_name_or_path: str = dataclasses.field(metadata={"help": "base model: a Hub folder (ours or stock Llama)"})
    data_files: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "JSON/JSONL files: instruction/input/output or prompt/response"}
    )
    eval_files: list[str] = dataclasses.field(default_factory=list, metadata={"help": "held-out records"})
    tokenizer_name_or_path: str | None = dataclasses.field(default=None, metadata={"help": "default: the model's"})
    prompt_template: str = dataclasses.field(
        default="alpaca", metadata={"help": "alpaca, plain, a JSON file {with_input, no_input} or a format string"}
    )
    max_seq_length: int = dataclasses.field(default=512, metadata={"help": "truncate examples to this many tokens"})
    packing: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "concatenate examples per batch with restarting position_ids (no padding, "
            "no attention across examples)"
        },
    )
    use_lora: bool = dataclasses.field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    qlora: bool = dataclasses.field(default=False, metadata={"help": "LoRA on a 4-bit NF4 base (bitsandbytes)"})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "modules that get adapters"}
    )
    merge_lora: bool = dataclasses.field(default=True, metadata={"help": "export base+adapters merged to OUT/merged"})
    attn_implementation: str = dataclasses.field(
        default="sdpa", metadata={"help": "sdpa, blocked_causal (fastest on CPU), eager, flash_attention_2"}
    )


def parse_args(argv: list[str] | None = None):
    """(FinetuneArguments, TrainingArguments) from ``--config FILE`` and the CLI: CLI > file > defaults."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (FinetuneArguments, TrainingArguments), prog="python -m training.finetune", description=__doc__
    )
    parser.add_argument("--config", default=None, help="YAML file of argument: value (the command line wins)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ddp_backend" not in argv and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        argv += ["--ddp_backend", "gloo"]  # CPU processes (DeepSpeed included) talk over gloo
    if "--config" in argv:
        i = argv.index("--config")
        values = load_yaml(argv[i + 1])
        del argv[i : i + 2]
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown argument(s) {unknown} in the config file; see --help")
        for action in parser._actions:  # YAML values become defaults, so the command line overrides them
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    ft, targs, rest = outputs[0], outputs[1], outputs[-1]  # (a namespace holding --config may sit in between)
    if rest:
        raise ConfigError(f"unrecognised arguments: {rest}")
    if not ft.data_files:
        raise ConfigError("--data_files is required (JSON/JSONL instruction records)")
    if ft.qlora:
        ft.use_lora = True
    return ft, targs


def build_datasets(ft: FinetuneArguments, tokenizer) -> tuple[list, list | None, dict[str, Any]]:
    from training.instruct_data import get_template, load_records, tokenize_example

    template = get_template(ft.prompt_template)

    def encode(files):
        kept, dropped = [], 0
        for record in load_records(files):
            prompt, response = template.format(record)
            ex = tokenize_example(tokenizer, prompt, response, ft.max_seq_length)
            if ex is None:
                dropped += 1
            else:
                kept.append(ex)
        return kept, dropped

    train, dropped = encode(ft.data_files)
    evals = encode(ft.eval_files)[0] if ft.eval_files else None
    stats = {
        "train_examples": len(train),
        "dropped_too_long": dropped,
        "train_tokens": sum(len(e["input_ids"]) for e in train),
        "response_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in train),
    }
    if not train:
        raise ConfigError("no training example fits max_seq_length")
    return train, evals, stats


def load_model(ft: FinetuneArguments, targs, for_merge: bool = False):
    from modeling_llama import LlamaForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": ft.attn_implementation}
    bf16 = bool(getattr(targs, "bf16", False))
    if ft.qlora and not for_merge:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        )
        kwargs["device_map"] = {"": "cuda" if torch.cuda.is_available() else "cpu"}
    else:
        kwargs["dtype"] = torch.float32
    model = LlamaForCausalLM.from_pretrained(ft.model_name_or_path, **kwargs)
    model.config.use_cache = False
    return model


def _checkpointing(targs) -> bool:
    return bool(getattr(targs, "activation_checkpointing", False))


def add_lora(model, ft: FinetuneArguments, targs):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if ft.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_checkpointing(targs))
    config = LoraConfig(
        r=ft.lora_r,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=list(ft.lora_target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


@contextlib.contextmanager
def _outside_zero3():
    """While a ZeRO-3 config is active (the Trainer's, under DeepSpeed), transformers loads and saves every model
    through ZeRO-3's partitioning, whose collectives all ranks must join. Inside this block, a model loaded on one
    rank is an ordinary full copy."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        hf_deepspeed = None
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def merge_adapters(ft: FinetuneArguments, targs, adapter_dir: str | Path, out: str | Path, tokenizer) -> Path:
    """Base model in full precision + saved adapters -> merged weights -> a Hub folder of our classes. Runs in one
    process (rank 0 after a distributed run), outside any ZeRO-3 partitioning."""
    from peft import PeftModel

    with _outside_zero3():
        base = load_model(ft, targs, for_merge=True)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    from transformers import DataCollatorWithFlattening, Trainer

    from modeling_llama import LlamaTokenizerFast
    from modeling_llama.modeling_llama import push_folder_to_hub
    from training.instruct_data import SFTCollator

    try:
        ft, targs = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    push, targs.push_to_hub = targs.push_to_hub, False  # uploaded once at the end, with our model card
    if push and not targs.hub_model_id:
        print("error: --push_to_hub needs --hub_model_id", file=sys.stderr)
        return 2
    try:
        tokenizer = LlamaTokenizerFast.from_pretrained(ft.tokenizer_name_or_path or ft.model_name_or_path)
        train, evals, stats = build_datasets(ft, tokenizer)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_model(ft, targs)
    if ft.use_lora:
        model = add_lora(model, ft, targs)
    if _checkpointing(targs) and not getattr(targs, "activation_checkpointing_kwargs", None):
        targs.activation_checkpointing_kwargs = {"use_reentrant": False}
    collator = (
        DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        if ft.packing
        else SFTCollator(tokenizer.pad_token_id)
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=collator,
        processing_class=tokenizer,
    )
    if trainer.is_world_process_zero():
        print(
            f"finetuning on {stats['train_examples']} examples ({stats['train_tokens']:,} tokens, "
            f"{stats['response_tokens']:,} trained; {stats['dropped_too_long']} too long), "
            f"{'QLoRA' if ft.qlora else 'LoRA' if ft.use_lora else 'full'}, packing={ft.packing}",
            file=sys.stderr,
        )
    result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model(targs.output_dir)
    metrics = dict(result.metrics)
    if evals:  # on every rank: ZeRO-3 gathers the parameters and the metrics are reduced across processes
        metrics.update(trainer.evaluate())
        if "eval_loss" in metrics:
            metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
    # The last collective is behind us: every rank tears the process group down here, together, while the
    # interpreter is alive. A gloo group left to interpreter shutdown, or torn down by one rank while another
    # still holds its own, aborted a rank after successful runs ("terminate called without an active exception",
    # cf. pytorch/pytorch#190489). What follows is rank 0's alone (no rank waits on its merge or upload).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    final = Path(targs.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(targs.output_dir)
        trainer.save_metrics("all", metrics)
        trainer.save_state()
        if ft.use_lora and ft.merge_lora:
            final = merge_adapters(ft, targs, targs.output_dir, Path(targs.output_dir) / "merged", tokenizer)
            print(f"merged adapters into {final}", file=sys.stderr)
        if push:
            push_folder_to_hub(final, targs.hub_model_id, commit_message="Upload instruction-finetuned LLaMA")
            print(f"pushed {final} to {targs.hub_model_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
