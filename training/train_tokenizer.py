"""Train a SentencePiece BPE tokenizer with the LLaMA paper's settings and write a loadable tokenizer folder.

The paper (Section 2.1): "We tokenize the data with the byte-pair encoding (BPE) algorithm, using the
implementation from SentencePiece. Notably, we split all numbers into individual digits, and fallback to bytes
to decompose unknown UTF-8 characters." Meta's ``tokenizer.model`` further shows identity normalization, no
whitespace collapsing, whitespace-only pieces, ``<unk>``/``<s>``/``</s>`` = 0/1/2 and no pad piece; we use the
same trainer spec.

    python -m training.train_tokenizer --input corpus.txt more.jsonl --vocab_size 8000 --output_dir tok/

The output folder holds ``tokenizer.model`` (sentencepiece), ``tokenizer.json`` and ``tokenizer_config.json``
and loads with ``LlamaTokenizer``, ``LlamaTokenizerFast`` and ``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

# Trainer settings shared with Meta's tokenizer.model (see its trainer_spec).
PAPER_SETTINGS: dict = {
    "model_type": "bpe",
    "split_digits": True,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "add_dummy_prefix": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "character_coverage": 0.99995,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
}


def iter_texts(paths: Sequence[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Documents of every input (``.txt``, ``.jsonl``, ``.parquet``, compressed, ``embedded:NAME``, datasets
    folders), read by :func:`training.data.read_documents`."""
    from training.data import read_documents

    for path in paths:
        yield from read_documents(path, text_key)


def iter_sentences(paths: Sequence[str | os.PathLike], text_key: str = "text", max_bytes: int = 4192) -> Iterator[str]:
    """Non-empty lines of every document, with a progress bar over bytes read.

    Newlines are never part of a sentencepiece training sentence (they become byte-fallback tokens), and lines
    longer than ``max_bytes`` are cut into chunks so that sentencepiece does not silently drop them.
    """
    with tqdm(unit="B", unit_scale=True, desc="reading corpus", file=sys.stderr) as bar:
        for doc in iter_texts(paths, text_key):
            for line in doc.split("\n"):
                bar.update(len(line.encode("utf-8")) + 1)
                while line:
                    chunk = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                    line = line[len(chunk) :]
                    if chunk.strip():
                        yield chunk


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    vocab_size: int = 32000,
    text_key: str = "text",
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Train the tokenizer and write ``output_dir`` (tokenizer.model, tokenizer.json, tokenizer_config.json).

    Args:
        inputs: text files (``.txt``: whole file is a document) or JSONL files with a ``text_key`` field.
        output_dir: folder to write (created).
        vocab_size: total vocabulary including the 3 special and 256 byte pieces.
        text_key: field of JSONL records holding the text.
        input_sentence_size: sample at most this many lines (0 = all).
        num_threads: trainer threads (default: all cores).
        seed: seed of sentencepiece's sampling.
        verbose: show sentencepiece's own training log.
    """
    import sentencepiece as spm

    from modeling_llama import LlamaTokenizerFast

    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must exceed 3 special + 256 byte pieces.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sentences = list(iter_sentences(inputs, text_key))
    if not sentences:
        raise ValueError(f"no text found in {', '.join(map(str, inputs))}")
    spm.set_random_generator_seed(seed)
    print(f"training BPE tokenizer: {len(sentences):,} lines, vocab_size={vocab_size}", file=sys.stderr)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
            **PAPER_SETTINGS,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg:
            raise ValueError(
                f"sentencepiece cannot build {vocab_size} pieces from this corpus: {msg.strip()} "
                "Use a smaller --vocab_size or more text."
            ) from e
        raise
    model_path = output_dir / "tokenizer.model"
    model_path.write_bytes(buf.getvalue())
    LlamaTokenizerFast(vocab_file=str(model_path)).save_pretrained(str(output_dir))
    print(f"wrote {output_dir}: {', '.join(sorted(os.listdir(output_dir)))}", file=sys.stderr)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.train_tokenizer",
        description="Train a SentencePiece BPE tokenizer with LLaMA's settings (split digits, byte fallback, "
        "identity normalization, whitespace kept) and write a folder LlamaTokenizer/LlamaTokenizerFast load.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".txt (one document per file), .jsonl (text_key field) or .parquet files, optionally .gz/.xz, "
        "datasets folders, or embedded:shakespeare",
    )
    p.add_argument("--output_dir", required=True, help="folder to write the tokenizer to")
    p.add_argument("--vocab_size", type=int, default=32000, help="vocabulary size (default 32000, as LLaMA)")
    p.add_argument("--text_key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--input_sentence_size", type=int, default=0, help="sample at most N lines (0: all)")
    p.add_argument("--num_threads", type=int, default=None, help="trainer threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="hide sentencepiece's training log (its progress report)")
    args = p.parse_args(argv)
    from training.data import DataError

    try:
        train_tokenizer(
            args.input,
            args.output_dir,
            vocab_size=args.vocab_size,
            text_key=args.text_key,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads,
            seed=args.seed,
            verbose=not args.quiet,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
