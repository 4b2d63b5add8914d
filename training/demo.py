"""Generation demo on a freshly initialised model: build, save as a Hub folder, reload, generate.

Exercises the whole foundation end to end on a laptop CPU in seconds: a preset config, our model and the real
LLaMA tokenizer, ``save_pretrained`` (weights, config, tokenizer, code files, model card), loading the folder
through ``pipeline("text-generation", trust_remote_code=True)``, batched generation of prompts of different
lengths, and token streaming with ``TextStreamer``. The weights are random, so the text is too.

    python -m training.demo --help
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "tokenizer.model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.demo",
        description="Build a randomly initialised LLaMA, save it as a Hub folder and generate from it.",
    )
    p.add_argument("--preset", default="tiny", help="model size preset (tiny, small, 100M, 7B ...); default tiny")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="SentencePiece tokenizer.model to use")
    p.add_argument("--output_dir", default="outputs/demo-model", help="where to write the Hub folder")
    p.add_argument("--max_new_tokens", type=int, default=20, help="tokens to generate per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initialisation")
    p.add_argument(
        "--prompt",
        action="append",
        help="prompt to complete (repeatable); default: three prompts of different lengths",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.tokenizer).is_file():
        print(
            f"error: tokenizer file {args.tokenizer} not found; pass --tokenizer PATH/tokenizer.model", file=sys.stderr
        )
        return 2

    import torch
    from transformers import TextStreamer, pipeline

    from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = LlamaTokenizerFast(vocab_file=args.tokenizer)
    config = LlamaConfig.from_preset(args.preset, vocab_size=len(tokenizer))
    model = LlamaForCausalLM(config).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built LLaMA preset {args.preset!r}: {n / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f}s)")

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved Hub folder {args.output_dir}: {', '.join(sorted(os.listdir(args.output_dir)))}")

    gen = pipeline("text-generation", model=args.output_dir, trust_remote_code=True, device="cpu")
    print(f"reloaded through pipeline(): {type(gen.model).__name__} from {type(gen.model).__module__}")
    prompts = args.prompt or ["The capital of France is", "Once upon a time", "def fibonacci(n):\n    "]
    outs = gen(prompts, max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=len(prompts))
    for prompt, out in zip(prompts, outs):
        print(f"--- {prompt!r}\n{out[0]['generated_text']!r}")

    print("--- streaming the first prompt token by token:")
    inputs = gen.tokenizer(prompts[0], return_tensors="pt")
    streamer = TextStreamer(gen.tokenizer, skip_special_tokens=True)
    gen.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    print(f"done in {time.perf_counter() - t0:.1f}s (random weights: the text is noise by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
