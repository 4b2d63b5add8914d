"""Pretraining data: tokenize corpora into memory-mapped token shards, then sample packed sequences from them.

Prepared folder (one per source)::

    meta.json           tokenizer fingerprint, dtype, shard list, inputs done (for resuming), totals
    tokens-00000.bin    flat token ids (uint16 when the vocabulary fits, else uint32)

Each document becomes ``[BOS] + tokens + [EOS]`` (documents separated by EOS, BOS at document start, as in the
original). Sequences are windows of ``seq_length + 1`` tokens (inputs and shifted labels) over a source's token
stream, packed across document boundaries.

Sampling (:class:`PackedMixture`) is a pure function of the seed and a draw counter, so it is deterministic,
restores its exact position from ``{"draws": n, "counts": [...]}``, and splits across ranks without overlap: every
rank walks the same global sequence of draws and materialises only its own slots. Within a source each epoch
visits every window once, in an order given by a seeded affine permutation (O(1) memory at any corpus size).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_llama.tokenization_llama_fast import encode_batch_ids

__all__ = [
    "DataError",
    "EMBEDDED_CORPORA",
    "read_documents",
    "prepare_data",
    "tokenizer_fingerprint",
    "TokenStream",
    "Source",
    "PackedMixture",
    "PretrainLoader",
]

EMBEDDED_CORPORA = {"shakespeare": Path(__file__).resolve().parent / "data" / "shakespeare.jsonl.xz"}
SHARD_TOKENS = 1 << 28  # tokens per .bin file (512 MB at uint16)


class DataError(Exception):
    """Unreadable or inconsistent data; the message names the file."""


# ------------------------------------------------------------------------------------------------ reading
def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _kind(path: Path) -> str:
    name = path.name
    for ext in (".gz", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def read_documents(spec: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one input.

    Args:
        spec: ``embedded:NAME`` (a corpus shipped with the package), a ``.txt`` file (one document), a ``.jsonl``
            file (one object per line with ``text_key``), a ``.parquet`` file (column ``text_key``), any of these
            compressed as ``.gz``/``.xz``, or a folder saved by ``datasets.Dataset.save_to_disk``.
        text_key: field / column holding the text.
    """
    spec = str(spec)
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED_CORPORA:
            raise DataError(f"unknown embedded corpus {name!r}; available: {', '.join(EMBEDDED_CORPORA)}")
        yield from read_documents(EMBEDDED_CORPORA[name], "text")
        return
    path = Path(spec)
    if path.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if text_key not in ds.column_names:
            raise DataError(f"{path}: dataset has no column {text_key!r} (columns: {ds.column_names})")
        for batch in ds.iter(batch_size=1000):
            yield from (t for t in batch[text_key] if t)
        return
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    kind = _kind(path)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_key not in pf.schema_arrow.names:
                raise DataError(f"{path}: parquet file has no column {text_key!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[text_key], batch_size=1000):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif kind == "jsonl":
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                        raise DataError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
                    yield record[text_key]
        else:
            with _open_text(path) as f:
                yield f.read()
    except DataError:
        raise
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    except Exception as e:  # pyarrow errors and the like
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ preparing
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's serialized pipeline: data prepared with another tokenizer is refused."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def _input_id(spec: str) -> str:
    if spec.startswith("embedded:"):
        return spec
    p = Path(spec).resolve()
    if not p.exists():
        raise DataError(f"{spec}: input file not found")
    st = p.stat()
    return f"{p}:{st.st_size}:{int(st.st_mtime)}"


def _encode_documents(backend, docs: list[str], bos: int, eos: int) -> np.ndarray:
    """``[BOS] + ids + [EOS]`` for every document, concatenated (the Rust encoder runs on all cores)."""
    flat: list[int] = []
    for ids in encode_batch_ids(backend, docs):  # (no offsets; the LLaMA normalizer's steps done in Python)
        flat.append(bos)
        flat.extend(ids)
        flat.append(eos)
    return np.asarray(flat, dtype=np.int64)


def prepare_data(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    tokenizer,
    text_key: str = "text",
    batch_size: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into token shards in ``output_dir``; resumes where an interrupted run stopped.

    Progress is committed input by input: meta.json lists the inputs done and the token count at that point, and
    a rerun truncates the shard files back to it and continues with the next input. Tokenization runs on all
    cores through the ``tokenizers`` library's batch encoder.

    Returns:
        The final meta.json contents.
    """
    from tqdm.auto import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    fingerprint = tokenizer_fingerprint(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DataError("the tokenizer needs BOS and EOS tokens to separate documents")
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    inputs = [str(i) for i in inputs]
    ids = [_input_id(i) for i in inputs]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenizer") != fingerprint:
            raise DataError(
                f"{out}: prepared with another tokenizer ({meta.get('tokenizer')} != {fingerprint}); "
                "use a new output folder"
            )
        done = int(meta.get("done", 0))
        if meta.get("paths", inputs) != inputs or meta.get("inputs", [])[:done] != ids[:done]:
            raise DataError(
                f"{out}: holds data prepared from other inputs (or a finished input changed since); "
                "use a new output folder"
            )
        if meta.get("complete"):
            return meta
        meta["inputs"] = ids  # inputs not read yet may have been fixed in between
    else:
        meta = {
            "tokenizer": fingerprint,
            "vocab_size": vocab,
            "dtype": dtype,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "paths": inputs,
            "inputs": ids,
            "done": 0,
            "tokens": 0,
            "documents": 0,
            "complete": False,
            "shard_tokens": SHARD_TOKENS,
        }
    np_dtype = np.dtype(meta["dtype"])
    total = meta["tokens"]
    # Roll back anything written after the last committed input (an interrupted run).
    k = 0
    while (path := out / f"tokens-{k:05d}.bin").exists():
        keep = min(SHARD_TOKENS, max(0, total - k * SHARD_TOKENS))
        if keep == 0:
            path.unlink()
        elif path.stat().st_size != keep * np_dtype.itemsize:
            with path.open("r+b") as f:
                f.truncate(keep * np_dtype.itemsize)
        k += 1
    backend = tokenizer.backend_tokenizer

    handle = None
    shard_index = total // SHARD_TOKENS

    def write(tokens: np.ndarray) -> None:
        nonlocal handle, shard_index, total
        while len(tokens):
            if handle is None:
                handle = (out / f"tokens-{shard_index:05d}.bin").open("ab")
            room = SHARD_TOKENS - total % SHARD_TOKENS
            chunk, tokens = tokens[:room], tokens[room:]
            handle.write(chunk.astype(np_dtype).tobytes())
            total += len(chunk)
            if total % SHARD_TOKENS == 0:
                handle.close()
                handle, shard_index = None, shard_index + 1

    bar = tqdm(desc=f"tokenizing {out.name}", unit=" docs", disable=not progress, file=sys.stderr)
    try:
        for k in range(meta["done"], len(inputs)):
            batch: list[str] = []
            docs = 0
            for doc in read_documents(inputs[k], text_key):
                batch.append(doc)
                if len(batch) >= batch_size:
                    write(_encode_documents(backend, batch, bos, eos))
                    docs += len(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                write(_encode_documents(backend, batch, bos, eos))
                docs += len(batch)
                bar.update(len(batch))
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
            meta.update(done=k + 1, tokens=total, documents=meta["documents"] + docs)
            tmp = meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(meta_path)  # the commit point of this input
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    if total < 2:
        raise DataError(f"{out}: the inputs hold no text")
    meta["complete"] = True
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ------------------------------------------------------------------------------------------------ reading shards
class TokenStream:
    """The token ids of a prepared folder as one memory-mapped sequence."""

    def __init__(self, folder: str | os.PathLike, expected_tokenizer: str | None = None) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.folder}: no meta.json; prepare it with python -m training.prepare_data")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        if not self.meta.get("complete"):
            raise DataError(f"{self.folder}: preparation did not finish; rerun prepare_data to resume it")
        if expected_tokenizer and self.meta["tokenizer"] != expected_tokenizer:
            raise DataError(f"{self.folder}: prepared with another tokenizer than the one training uses")
        self.n_tokens = int(self.meta["tokens"])
        shard = int(self.meta.get("shard_tokens", SHARD_TOKENS))
        dtype = np.dtype(self.meta["dtype"])
        self.shards = []
        for k in range(math.ceil(self.n_tokens / shard)):
            path = self.folder / f"tokens-{k:05d}.bin"
            want = min(shard, self.n_tokens - k * shard)
            if not path.is_file() or path.stat().st_size != want * dtype.itemsize:
                raise DataError(f"{path}: missing or truncated (expected {want} tokens)")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.shard_tokens = shard

    def __len__(self) -> int:
        return self.n_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 (may span shard files)."""
        parts = []
        while length > 0:
            k, off = divmod(start, self.shard_tokens)
            take = min(length, self.shard_tokens - off)
            parts.append(np.asarray(self.shards[k][off : off + take], dtype=np.int64))
            start, length = start + take, length - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclasses.dataclass
class Source:
    """A weighted token stream restricted to its train or validation range."""

    name: str
    stream: TokenStream
    weight: float
    begin: int
    end: int


def split_sources(
    streams: Sequence[tuple[str, TokenStream, float]], seq_length: int, validation_fraction: float
) -> tuple[list[Source], list[Source]]:
    """Hold out the last ``validation_fraction`` of every source (at least one window) for validation."""
    train, val = [], []
    for name, stream, weight in streams:
        n = len(stream)
        n_val = 0 if validation_fraction <= 0 else max(seq_length + 1, int(n * validation_fraction))
        if n - n_val < seq_length + 1:
            raise DataError(
                f"source {name!r} has {n} tokens: too few for seq_length {seq_length} "
                f"with a {validation_fraction:.1%} validation split"
            )
        train.append(Source(name, stream, weight, 0, n - n_val))
        if n_val:
            val.append(Source(name, stream, weight, n - n_val, n))
    return train, val


class PackedMixture:
    """Deterministic weighted sampling of ``seq_length + 1``-token windows from several sources.

    Draw ``g`` picks a source by weight with uniform ``u_g`` (block-seeded by ``(seed, g // 4096)``); the k-th
    draw of source s reads window ``perm_{s,e}(k mod n_s)`` of epoch ``e = k // n_s``.
    """

    BLOCK = 4096

    def __init__(self, sources: Sequence[Source], seq_length: int, seed: int) -> None:
        if not sources:
            raise DataError("no data sources")
        self.sources = list(sources)
        self.seq_length = seq_length
        self.seed = seed
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any():
            raise DataError("source weights must be positive")
        self.cdf = np.cumsum(weights / weights.sum())
        self.cdf[-1] = 1.0
        self.n_windows = [(s.end - s.begin - 1) // seq_length for s in sources]
        self.draws = 0
        self.counts = [0] * len(sources)
        self._block_id = -1
        self._block: np.ndarray | None = None
        self._perms: dict[tuple[int, int], tuple[int, int]] = {}

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "counts": list(self.counts),
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sources") != [s.name for s in self.sources] or state.get("seed") != self.seed:
            raise DataError("the data state belongs to another mixture (sources or seed differ)")
        self.draws = int(state["draws"])
        self.counts = [int(c) for c in state["counts"]]

    # -- sampling
    def _uniform(self, g: int) -> float:
        block = g // self.BLOCK
        if block != self._block_id:
            rng = np.random.default_rng([self.seed, 0x5EED, block])
            self._block, self._block_id = rng.random(self.BLOCK), block
        return float(self._block[g % self.BLOCK])

    def _perm(self, s: int, epoch: int) -> tuple[int, int]:
        key = (s, epoch)
        if key not in self._perms:
            n = self.n_windows[s]
            rng = np.random.default_rng([self.seed, s, epoch])
            a = 1
            if n > 2:
                while True:
                    a = int(rng.integers(1, n))
                    if math.gcd(a, n) == 1:
                        break
            b = int(rng.integers(0, n)) if n > 1 else 0
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = (a, b)
        return self._perms[key]

    def next_draw(self) -> tuple[int, int]:
        """Advance by one global draw; return (source index, token offset of its window)."""
        s = int(np.searchsorted(self.cdf, self._uniform(self.draws), side="right"))
        s = min(s, len(self.sources) - 1)
        k = self.counts[s]
        n = self.n_windows[s]
        epoch, j = divmod(k, n)
        a, b = self._perm(s, epoch)
        window = (a * j + b) % n
        self.counts[s] += 1
        self.draws += 1
        return s, self.sources[s].begin + window * self.seq_length

    def read(self, s: int, offset: int) -> np.ndarray:
        return self.sources[s].stream.window(offset, self.seq_length + 1)

    def epochs(self) -> dict[str, float]:
        """How many passes over each source the draws so far amount to."""
        return {src.name: c / max(n, 1) for src, c, n in zip(self.sources, self.counts, self.n_windows)}


class PretrainLoader:
    """This rank's micro-batches of one optimizer step, cut from the global sequence of draws.

    A global step consumes ``micro_batch * accumulation * world`` draws; micro-step ``a`` of rank ``r`` takes the
    ``micro_batch`` draws at ``(a * world + r) * micro_batch``. A single process with ``world * accumulation``
    accumulation steps therefore sees exactly the same sequences.
    """

    def __init__(self, mixture: PackedMixture, micro_batch: int, accumulation: int, world: int, rank: int) -> None:
        self.mixture = mixture
        self.micro_batch, self.accumulation, self.world, self.rank = micro_batch, accumulation, world, rank

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world

    def next_step(self) -> list[torch.Tensor]:
        """``accumulation`` tensors of shape (micro_batch, seq_length + 1)."""
        draws = [self.mixture.next_draw() for _ in range(self.sequences_per_step)]
        out = []
        for a in range(self.accumulation):
            first = (a * self.world + self.rank) * self.micro_batch
            rows = [self.mixture.read(*d) for d in draws[first : first + self.micro_batch]]
            out.append(torch.from_numpy(np.stack(rows)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)


def sample_text(stream: TokenStream, tokenizer, n_tokens: int = 64) -> str:
    """Decode the first ``n_tokens`` of a stream (for logs)."""
    return tokenizer.decode(stream.window(0, min(n_tokens, len(stream))).tolist())


def describe_sources(sources: Sequence[Source]) -> str:
    buf = io.StringIO()
    for s in sources:
        buf.write(f"  {s.name}: {s.end - s.begin:,} tokens, weight {s.weight}\n")
    return buf.getvalue()
