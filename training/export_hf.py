"""Export a training checkpoint (single/DDP, DeepSpeed ZeRO-3 or FSDP2) as a Hugging Face folder, in one process.

    python -m training.export_hf --checkpoint runs/tiny/checkpoints/checkpoint-00000300 --output_dir tiny-hf

The run folder's ``config.yaml`` and ``tokenizer/`` give the architecture and the tokenizer. Sharded states are
merged: DeepSpeed's ZeRO partitions through DeepSpeed's zero_to_fp32, FSDP2's torch.distributed.checkpoint
shards through DCP's single-process loader.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path) -> Path:
    from modeling_llama import LlamaTokenizerFast
    from training.checkpoint import CheckpointError, load_hf_state_dict_from_checkpoint
    from training.config import load_yaml
    from training.pretrain import PretrainConfig, save_hf_folder

    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "tokenizer").is_dir():
        raise CheckpointError(f"{run_dir}: expected the run folder of {checkpoint} to hold config.yaml and tokenizer/")
    cfg = PretrainConfig(**load_yaml(run_dir / "config.yaml"))
    tokenizer = LlamaTokenizerFast.from_pretrained(run_dir / "tokenizer")
    state_dict = load_hf_state_dict_from_checkpoint(checkpoint)
    from modeling_llama import LlamaConfig

    if cfg.init_from:
        model_config = LlamaConfig.from_pretrained(cfg.init_from)
    else:
        overrides = {
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max(cfg.seq_length, 2048),
            **cfg.model_config,
        }
        model_config = LlamaConfig.from_preset(cfg.model_preset, **overrides)
    return save_hf_folder(state_dict, model_config, tokenizer, output_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.export_hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/checkpoint-N (or a run folder: its latest)")
    p.add_argument("--output_dir", required=True, help="Hub folder to write")
    args = p.parse_args(argv)
    from training.checkpoint import CheckpointError, CheckpointManager

    try:
        ckpt = Path(args.checkpoint)
        if (ckpt / "config.yaml").is_file():
            ckpt = CheckpointManager(ckpt).resolve("latest")
        out = export_checkpoint(ckpt, args.output_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
