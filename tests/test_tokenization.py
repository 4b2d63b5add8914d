"""Tokenizers against sentencepiece itself, on Meta's tokenizer.model and on one trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_llama import LlamaTokenizer, LlamaTokenizerFast

CASES = [
    "",
    " ",
    "   ",
    "Hello",
    " Hello",
    "Hello ",
    "  Hello   world  ",
    "\tTabs\tand\nnewlines\n\n",
    "\n",
    "line one\r\nline two",
    "Numbers 1234567890 and 3.14159 and -42",
    "2023",
    "日本語のテキスト、中文文本。한국어",
    "Emoji 🙂👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "Combining: e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "Unseen: \U0001f9ec \u2fff \U00010380 \ue000",
    "Zero width\u200bjoiner\u200d and NBSP\u00a0here",
    "<s> literal </s> and <unk> in text",
    "    def f(x):\n        return x ** 2  # comment\n",
    "a" + " " * 40 + "b",
    "\x00\x01\x7f control chars",
    " ⁇ ",
    "▁already▁has▁meta▁space",
]


@pytest.fixture(scope="module")
def real(real_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=real_tokenizer_path)
    return sp, LlamaTokenizer(vocab_file=real_tokenizer_path), LlamaTokenizerFast(vocab_file=real_tokenizer_path)


@pytest.fixture(scope="module")
def trained(trained_tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(trained_tokenizer_dir / "tokenizer.model"))
    return (
        sp,
        LlamaTokenizer.from_pretrained(trained_tokenizer_dir),
        LlamaTokenizerFast.from_pretrained(trained_tokenizer_dir),
    )


def check_parity(sp, slow, fast, text: str) -> None:
    expected = [sp.bos_id()] + sp.encode(text)
    assert slow(text)["input_ids"] == expected, f"slow differs on {text!r}"
    assert fast(text)["input_ids"] == expected, f"fast differs on {text!r}"
    assert slow.encode(text, add_special_tokens=False) == expected[1:]
    assert fast.encode(text, add_special_tokens=False) == expected[1:]
    reference = sp.decode(expected[1:])
    # Lossless except for U+2581 "▁", sentencepiece's own space symbol, which decodes to a space.
    assert reference == text.replace("\u2581", " ")
    for tok in (slow, fast):
        assert tok.decode(expected[1:]) == reference
        assert tok.decode(expected, skip_special_tokens=True) == reference


@pytest.mark.parametrize("text", CASES)
def test_real_tokenizer_matches_sentencepiece(real, text):
    check_parity(*real, text)


@pytest.mark.parametrize("text", CASES)
def test_trained_tokenizer_matches_sentencepiece(trained, text):
    check_parity(*trained, text)


def test_known_ids_of_the_real_tokenizer(real):
    _, slow, fast = real
    for tok in (slow, fast):
        # transformers 5.x's own LlamaTokenizer gives [1, 15043] here (shared/FACTS.md)
        assert tok(" Hello")["input_ids"] == [1, 29871, 15043]
        assert tok("Hello")["input_ids"] == [1, 15043]
        assert tok("2024")["input_ids"][1:] == [29871, 29906, 29900, 29906, 29946]  # digits one per token
        assert tok.convert_ids_to_tokens(tok("\n")["input_ids"]) == ["<s>", "▁", "<0x0A>"]  # byte fallback
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 32000)


text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
tricky_strategy = st.text(alphabet=" \t\n\r0123456789abcXYZ.,'\"-_日本🙂é\u0301\u200b▁<>/s", max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(text_strategy, tricky_strategy))
def test_property_real_slow_fast_sentencepiece_agree(real, text):
    check_parity(*real, text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(text_strategy, tricky_strategy))
def test_property_trained_slow_fast_sentencepiece_agree(trained, text):
    check_parity(*trained, text)


def test_literal_special_tokens_are_text_unless_asked(real):
    sp, slow, fast = real
    text = "Answer</s><s>more"
    for tok in (slow, fast):
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text)
        assert 2 not in ids and ids.count(1) == 1, "user text must not inject EOS/BOS"
        parsed = tok(text, split_special_tokens=False)["input_ids"]
        assert parsed.count(2) == 1 and parsed.count(1) == 2
    assert slow(text, split_special_tokens=False)["input_ids"] == fast(text, split_special_tokens=False)["input_ids"]


def test_bos_eos_options_and_pairs(real_tokenizer_path):
    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        tok = cls(vocab_file=real_tokenizer_path, add_eos_token=True)
        assert tok("Hi")["input_ids"] == [1, 6324, 2]
        tok = cls(vocab_file=real_tokenizer_path, add_bos_token=False)
        assert tok("Hi")["input_ids"] == [6324]
        tok = cls(vocab_file=real_tokenizer_path)
        assert tok("Hi", "there")["input_ids"] == [1, 6324, 1, 727]
        assert tok.decode([1, 6324, 2, 727]) == "<s> Hi</s> there"  # the word-initial space is kept after <s>


def test_padding_is_left_with_unk_and_masked(real):
    _, slow, fast = real
    for tok in (slow, fast):
        batch = tok(["Hi", "Hello there friend"], padding=True, return_tensors="pt")
        assert tok.padding_side == "left" and tok.pad_token_id == 0 != tok.eos_token_id
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (2, 4)  # [<s>, Hello, there, friend]
        assert ids[0].tolist() == [0, 0, 1, 6324] and mask[0].tolist() == [0, 0, 1, 1]
        assert mask[1].tolist() == [1, 1, 1, 1]
        right = tok(["Hi", "Hello there friend"], padding=True, padding_side="right")["input_ids"]
        assert right[0] == [1, 6324, 0, 0]


def test_fast_tokenizer_folder_round_trip_and_stock_loading(real, tmp_path):
    sp, _, fast = real
    fast.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["auto_map"]["AutoTokenizer"] == [
        "tokenization_llama.LlamaTokenizer",
        "tokenization_llama_fast.LlamaTokenizerFast",
    ]
    loaded = [
        LlamaTokenizerFast.from_pretrained(tmp_path),
        LlamaTokenizer.from_pretrained(tmp_path),
        transformers.AutoTokenizer.from_pretrained(tmp_path),  # stock, no trust_remote_code
    ]
    assert isinstance(loaded[0], LlamaTokenizerFast) and isinstance(loaded[1], LlamaTokenizer)
    assert not isinstance(loaded[2], (LlamaTokenizer, LlamaTokenizerFast))
    for text in CASES:
        expected = [1] + sp.encode(text)
        for tok in loaded:
            assert tok(text)["input_ids"] == expected, (type(tok).__name__, text)
    assert loaded[2].pad_token_id == 0 and loaded[2].padding_side == "left"


def test_importing_our_package_does_not_change_stock_llama_tokenizer_resolution(real_tokenizer_path, tmp_path):
    # A folder that says tokenizer_class "LlamaTokenizer" (as stock checkpoints do) still gets stock's class.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "tokenizer.model").write_bytes(Path(real_tokenizer_path).read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok).__module__.startswith("transformers.")


def test_missing_or_bad_tokenizer_files_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="needs tokenizer_file=<tokenizer.json> or vocab_file=<tokenizer.model>"):
        LlamaTokenizerFast(vocab_file=str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        LlamaTokenizerFast(vocab_file=str(bad))


def _shakespeare(n: int) -> list[str]:
    import lzma

    path = Path(__file__).resolve().parent.parent / "training" / "data" / "shakespeare.jsonl.xz"
    with lzma.open(path, "rt") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def _clean_copy(backend):
    """A copy of the backend without padding or truncation (other tests pad the shared one)."""
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    clean.encode_special_tokens = backend.encode_special_tokens  # (to_str does not carry it)
    return clean


def _batch_ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def _clean_ids(backend, texts: list[str]) -> list[list[int]]:
    """The backend's own batch ids, from its clean copy."""
    return _batch_ids(_clean_copy(backend), texts)


def test_encode_batch_ids_gives_the_backends_ids(real, trained):
    """encode_batch_ids (what training/ encodes corpora with) does the LLaMA normalizer's two steps in Python and
    the rest in a normalizer-free copy: the same ids as the backend's own batch encoder on every text (empty,
    whitespace, literal special tokens, newlines), and sentencepiece's on real documents."""
    from tokenizers import Tokenizer, normalizers

    from modeling_llama.tokenization_llama_fast import _copies, encode_batch_ids

    docs = _shakespeare(4) + CASES
    for sp, _, fast in (real, trained):
        backend = fast.backend_tokenizer
        assert encode_batch_ids(backend, docs) == _clean_ids(backend, docs)
        # sentencepiece's ids, literal "<s>" / "</s>" / "<unk>" as text included (the backend's setting)
        assert encode_batch_ids(backend, docs) == sp.encode(docs)
    assert _copies(real[2].backend_tokenizer)[1] is not None  # the real tokenizer takes the Python path
    # any other normalizer: the backend's own path, the same ids
    other = Tokenizer.from_str(real[2].backend_tokenizer.to_str())
    other.normalizer = normalizers.Sequence([normalizers.Lowercase(), other.normalizer])
    assert _copies(other)[1] is None
    assert encode_batch_ids(other, docs) == _clean_ids(other, docs)


def test_encode_batch_ids_follows_the_backend_and_never_pads(real_tokenizer_path):
    """A corpus is never padded or truncated, whatever the tokenizer was last called with; tokens added after a
    first call, or a normalizer changed in place, are seen by the next one."""
    from tokenizers import AddedToken, normalizers

    from modeling_llama.tokenization_llama_fast import encode_batch_ids

    tok = LlamaTokenizerFast(vocab_file=real_tokenizer_path)
    backend = tok.backend_tokenizer
    texts = ["a short one", "and a much longer text than the first one here", ""]
    before = encode_batch_ids(backend, texts)
    tok(texts, padding=True, truncation=True, max_length=4)  # leaves padding/truncation set on the backend
    assert (
        encode_batch_ids(backend, texts)
        == before
        == spm.SentencePieceProcessor(model_file=real_tokenizer_path).encode(texts)
    )
    backend.add_tokens([AddedToken("much longer", normalized=False)])
    added = encode_batch_ids(backend, texts)
    assert backend.token_to_id("much longer") in added[1] and added[0] == before[0]
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), backend.normalizer])
    assert encode_batch_ids(backend, ["ABC"]) == encode_batch_ids(backend, ["abc"])


@pytest.fixture
def real_clean(real):
    """The real fast tokenizer's backend and its clean copy, made once per test, not per example (~0.3 s each)."""
    backend = real[2].backend_tokenizer
    return backend, _clean_copy(backend)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.one_of(text_strategy, tricky_strategy), max_size=6))
def test_property_encode_batch_ids_gives_the_backends_ids(real_clean, texts):
    from modeling_llama.tokenization_llama_fast import encode_batch_ids

    backend, clean = real_clean
    assert encode_batch_ids(backend, texts) == _batch_ids(clean, texts)
