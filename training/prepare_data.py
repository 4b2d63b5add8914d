"""Tokenize corpora into memory-mapped token shards for pretraining (resumable, parallel, with a progress bar).

    python -m training.prepare_data --input part1.jsonl part2.jsonl --tokenizer my-tokenizer --output_dir data/web
    python -m training.prepare_data --input embedded:shakespeare --tokenizer my-tokenizer --output_dir data/shk

Inputs: ``.txt`` (a file is a document), ``.jsonl`` (``--text_key`` field), ``.parquet`` (``--text_key`` column),
any of them ``.gz``/``.xz``-compressed, folders written by ``datasets.Dataset.save_to_disk``, or
``embedded:shakespeare``. Each document becomes ``<s> tokens </s>``. An interrupted run resumes from the last
input it finished when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.prepare_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help="input files / folders / embedded:NAME")
    p.add_argument("--output_dir", required=True, help="folder for meta.json and tokens-*.bin")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.model")
    p.add_argument("--text_key", default="text", help="JSONL field / parquet column with the text (default: text)")
    p.add_argument("--batch_size", type=int, default=512, help="documents per tokenizer batch")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)

    from modeling_llama import LlamaTokenizerFast
    from training.data import DataError, prepare_data

    tok_path = Path(args.tokenizer)
    try:
        if tok_path.is_dir():
            tokenizer = LlamaTokenizerFast.from_pretrained(tok_path)
        elif tok_path.is_file():
            tokenizer = LlamaTokenizerFast(vocab_file=str(tok_path))
        else:
            raise DataError(f"{tok_path}: tokenizer not found (a folder or a tokenizer.model file)")
        meta = prepare_data(
            args.input,
            args.output_dir,
            tokenizer,
            text_key=args.text_key,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.output_dir}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
