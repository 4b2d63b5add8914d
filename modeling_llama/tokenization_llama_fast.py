"""``tokenizers``-backed LLaMA tokenizer, converted from ``tokenizer.model`` so that it gives sentencepiece's ids.

Why not transformers' own converter: transformers 5.x installs a ``Metaspace`` pre-tokenizer, which encodes any
text with leading whitespace differently from sentencepiece (``" Hello"`` -> ``[1, 15043]`` instead of
``[1, 29871, 15043]``). The faithful layout reproduces what sentencepiece's BPE does:

- normalizer: ``Prepend("▁")`` (the dummy prefix) then ``Replace(" ", "▁")``; the only pre-tokenizer splits at
  newlines when no piece contains one (exact: sentencepiece cannot merge across them), so a line is one "word" for
  the BPE model as in sentencepiece (whitespace-only pieces like ``"▁▁▁▁"`` included);
- model: BPE with ``byte_fallback`` whose merges are every split ``(left, right)`` of every vocabulary piece,
  ranked by the *score* of the merged piece (sentencepiece merges the highest-scoring adjacent pair first), not by
  piece id. Among merges of equal score sentencepiece takes the leftmost pair; LLaMA's only equal scores are its
  whitespace-only pieces, for which ranking longer left operands first reproduces that greedy left-to-right growth;
- decoder: ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``, ``Strip`` of the one dummy-prefix space.

See :mod:`.tokenization_llama` for the choices on literal special tokens and padding, which this class shares.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .tokenization_llama import LlamaTokenizer

__all__ = ["LlamaTokenizerFast", "convert_sentencepiece_to_tokenizer", "encode_batch_ids"]

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
SPIECE_UNDERLINE = "▁"

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _load_model_proto(path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # pragma: no cover - sentencepiece is a hard requirement of the package
        raise ImportError("Converting tokenizer.model needs the `sentencepiece` and `protobuf` packages.") from e
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        data = f.read()
    try:
        proto.ParseFromString(data)
    except Exception as e:
        raise ValueError(f"{path} is not a SentencePiece model file (could not parse it: {e}).") from e
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model file (it holds no pieces).")
    return proto


def convert_sentencepiece_to_tokenizer(vocab_file: str) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that encodes and decodes like ``SentencePieceProcessor(vocab_file)``.

    Args:
        vocab_file: a SentencePiece BPE model (``tokenizer.model``) with byte fallback.
    """
    proto = _load_model_proto(vocab_file)
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError(
            f"{vocab_file} is a SentencePiece model of type {proto.trainer_spec.model_type}, not BPE; "
            "LLaMA tokenizers are BPE models."
        )
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError(f"{vocab_file} uses treat_whitespace_as_suffix, which LLaMA tokenizers do not.")

    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    mergeable = {piece for piece, _, kind in pieces if kind in (_NORMAL, _USER_DEFINED, _UNUSED)}
    merges: list[tuple[float, int, int, int, str, str]] = []
    for piece, score, kind in pieces:
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                # Highest score first; among equal scores, longer left operand first (see module docstring).
                merges.append((-score, -len(left), vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in merges],
        unk_token=proto.trainer_spec.unk_piece or "<unk>",
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
        dropout=None,
    )
    tok = Tokenizer(bpe)

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(steps)
    # Sentencepiece never merges across a character that no piece contains. When no piece holds a newline (true
    # of LLaMA's vocabulary and of every tokenizer trained by training.train_tokenizer, whose sentences are lines),
    # splitting at newlines is exact and lets the batch encoder work line by line (faster, and cached).
    if not any("\n" in piece for piece, _, kind in pieces if kind in (_NORMAL, _USER_DEFINED)):
        tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    else:
        tok.pre_tokenizer = None
    dec = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)

    specials = [
        AddedToken(piece, special=True, normalized=False) for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)
    ]
    tok.add_special_tokens(specials)
    user_defined = [
        AddedToken(piece, special=False, normalized=False) for piece, _, kind in pieces if kind == _USER_DEFINED
    ]
    if user_defined:
        tok.add_tokens(user_defined)
    return tok


# The normalizer of a LLaMA-style tokenizer (dummy prefix, spaces to "▁"): encode_batch_ids applies it in Python.
_PREFIX_AND_SPACES = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
    ],
}
_COPIES: dict[int, tuple] = {}  # id(backend) -> (backend, its _state_key, plain copy, bare copy or None)


def _state_key(backend: Tokenizer) -> tuple:
    """What decides ``backend``'s ids apart from its BPE model, which cannot change in place (a few µs to read)."""
    norm, pre = backend.normalizer, backend.pre_tokenizer
    added = tuple(t.content for _, t in sorted(backend.get_added_tokens_decoder().items()))
    return (
        None if norm is None else norm.__getstate__(),
        None if pre is None else pre.__getstate__(),
        added,
        backend.get_vocab_size(with_added_tokens=True),
        getattr(backend, "encode_special_tokens", None),  # (not serialised by to_str: copied by hand)
    )


def _copies(backend: Tokenizer) -> tuple[Tokenizer, Tokenizer | None, tuple[str, ...]]:
    """Copies of ``backend`` without padding or truncation: one as it is, one without its normalizer where that
    normalizer is :data:`_PREFIX_AND_SPACES` (else ``None``); and the contents of its added tokens. Rebuilt when
    the backend's normalizer, pre-tokenizer or added tokens changed since."""
    key = _state_key(backend)
    normalizer, _, added, _, special_as_text = key
    entry = _COPIES.get(id(backend))
    if entry is None or entry[0] is not backend or entry[1] != key:
        text = backend.to_str()
        plain = Tokenizer.from_str(text)
        bare = None
        if normalizer is not None and json.loads(normalizer) == _PREFIX_AND_SPACES:
            bare = Tokenizer.from_str(text)
            bare.normalizer = None
        for tok in (plain, bare):
            if tok is not None:
                tok.no_padding()
                tok.no_truncation()
                if special_as_text is not None:  # literal special tokens as text (our tokenizers' default) or not
                    tok.encode_special_tokens = special_as_text
        if len(_COPIES) >= 8:  # (a few tokenizers per process at most; keep the cache small)
            _COPIES.clear()
        entry = _COPIES[id(backend)] = (backend, key, plain, bare)
    return entry[2], entry[3], added


def encode_batch_ids(backend: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text, as ``backend.encode_batch_fast(texts, add_special_tokens=False)`` gives them without
    padding or truncation (whatever ``backend`` was last set to), computed faster for LLaMA-style tokenizers: the
    normalizer's two steps (the "▁" dummy prefix on a non-empty text, spaces to "▁") are done by Python's
    ``str.replace`` and the rest by a copy of ``backend`` without its normalizer, which then skips the alignment
    bookkeeping of normalizing (5 MB of Shakespeare on one thread of an Intel Xeon: 1.08x-1.20x the
    backend's own ``encode_batch_fast``, three runs; ``benchmarks/RESULTS.md``). Texts that
    hold an added token's content (``"<s>"``, ...) and tokenizers with any other normalizer take the backend's
    own path, so the ids are the same in every case. For corpora (``training/``): no offsets are computed."""

    def encode(tok: Tokenizer, batch: list[str]) -> list[list[int]]:
        fn = getattr(tok, "encode_batch_fast", tok.encode_batch)  # (tokenizers >= 0.21 has the fast one)
        return [e.ids for e in fn(batch, add_special_tokens=False)]

    plain, bare, added = _copies(backend)
    if bare is None:
        return encode(plain, texts)
    holds_added = [any(a in t for a in added) for t in texts]
    pre = [SPIECE_UNDERLINE + t.replace(" ", SPIECE_UNDERLINE) if t else t for t, h in zip(texts, holds_added) if not h]
    ids = encode(bare, pre)
    if not any(holds_added):
        return ids
    rest, done = iter(encode(plain, [t for t, h in zip(texts, holds_added) if h])), iter(ids)
    return [next(rest) if h else next(done) for h in holds_added]


class LlamaTokenizerFast(TokenizersBackend):
    """Fast LLaMA tokenizer with the ids of ``sentencepiece`` on the same ``tokenizer.model``.

    Built from ``tokenizer.json`` when present, otherwise converted from ``tokenizer.model`` by
    :func:`convert_sentencepiece_to_tokenizer`. Same arguments as :class:`LlamaTokenizer`.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    slow_tokenizer_class = LlamaTokenizer
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = "<unk>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        tokenizer_object = kwargs.pop("tokenizer_object", None)
        for stale in ("vocab", "merges", "legacy", "add_prefix_space", "post_processor"):
            kwargs.pop(stale, None)
        if tokenizer_object is None:
            if tokenizer_file is not None and os.path.isfile(tokenizer_file):
                tokenizer_object = Tokenizer.from_file(tokenizer_file)
            elif vocab_file is not None and os.path.isfile(vocab_file):
                tokenizer_object = convert_sentencepiece_to_tokenizer(vocab_file)
            else:
                raise ValueError(
                    "LlamaTokenizerFast needs tokenizer_file=<tokenizer.json> or vocab_file=<tokenizer.model>; "
                    f"got tokenizer_file={tokenizer_file!r}, vocab_file={vocab_file!r}."
                )
        kwargs.setdefault("padding_side", "left")
        super().__init__(
            tokenizer_object=tokenizer_object,
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.update_post_processor()

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        # Our __init__ reads tokenizer.json / tokenizer.model itself; transformers' generic extraction would
        # rebuild the backend with a different (Metaspace) layout.
        return kwargs

    @property
    def can_save_slow_tokenizer(self) -> bool:
        return bool(self.vocab_file) and os.path.isfile(self.vocab_file)

    def update_post_processor(self) -> None:
        """BOS/EOS template: ``<s> $A`` by default; ``<s> $A <s> $B`` for pairs (as in Meta's code, BOS per text)."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = self.add_bos_token and bos is not None
        add_eos = self.add_eos_token and eos is not None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        special = []
        if add_bos:
            special.append((str(bos), self.convert_tokens_to_ids(str(bos))))
        if add_eos:
            special.append((str(eos), self.convert_tokens_to_ids(str(eos))))
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Save ``tokenizer.json`` (+ ``tokenizer.model``) and a config that stock transformers reads faithfully.

        ``tokenizer_class`` is written as ``TokenizersBackend``: stock transformers then runs ``tokenizer.json``
        as is (sentencepiece's ids), instead of rebuilding it with its own Llama layout, which differs on leading
        whitespace. ``auto_map`` still points ``trust_remote_code`` loads at these classes.
        """
        import json

        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        path = os.path.join(save_directory, (prefix + "-" if prefix else "") + "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg["tokenizer_class"] = "TokenizersBackend"
            cfg["add_bos_token"], cfg["add_eos_token"] = self.add_bos_token, self.add_eos_token
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        files = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return tuple(files) + tuple(self.save_vocabulary(str(save_directory), filename_prefix))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy ``tokenizer.model`` next to ``tokenizer.json`` so the slow class (and sentencepiece) can load it."""
        if not self.can_save_slow_tokenizer:
            return ()
        import shutil

        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
