"""training.data: token shards from every input format, resumable preparation, the packed mixture loader."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from modeling_llama import LlamaTokenizerFast
from training.data import (
    DataError,
    PackedMixture,
    PretrainLoader,
    TokenStream,
    prepare_data,
    read_documents,
    split_sources,
)

DOCS = ["First document.\nWith two lines.", "  Second, with leading spaces and 1234 digits", "日本語 🙂 third"]


@pytest.fixture(scope="module")
def tok(trained_tokenizer_dir):
    return LlamaTokenizerFast.from_pretrained(trained_tokenizer_dir)


def expected_tokens(tok, docs) -> list[int]:
    out = []
    for d in docs:
        out += [tok.bos_token_id] + tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    return out


def stream_tokens(folder) -> list[int]:
    s = TokenStream(folder)
    return s.window(0, len(s)).tolist()


def test_every_input_format_gives_bos_doc_eos(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(DOCS[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[1]}) + "\n\n" + json.dumps({"text": DOCS[2]}) + "\n")
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "c.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "d"))

    prepare_data([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"], tmp_path / "out1", tok, progress=False)
    assert stream_tokens(tmp_path / "out1") == expected_tokens(tok, DOCS)
    prepare_data([tmp_path / "c.parquet"], tmp_path / "out2", tok, text_key="content", progress=False)
    assert stream_tokens(tmp_path / "out2") == expected_tokens(tok, DOCS)
    meta = prepare_data([tmp_path / "d"], tmp_path / "out3", tok, progress=False)
    assert stream_tokens(tmp_path / "out3") == expected_tokens(tok, DOCS)
    assert meta["documents"] == 3 and meta["dtype"] == "uint16" and meta["complete"]
    shakespeare = list(read_documents("embedded:shakespeare"))
    assert len(shakespeare) == 42 and "To be, or not to be" in "".join(shakespeare)


def test_preparation_resumes_after_a_failure(tmp_path, tok):
    good = [json.dumps({"text": f"document {i} " + "word " * (i % 7)}) for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(good[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(good[10:20]) + "\n{broken\n")
    (tmp_path / "c.jsonl").write_text("\n".join(good[20:]) + "\n")
    inputs = [tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    with pytest.raises(DataError, match=r"b\.jsonl:11: not a JSON object"):
        prepare_data(inputs, tmp_path / "out", tok, batch_size=3, progress=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["done"] == 1 and not meta["complete"]  # a.jsonl committed, b.jsonl's partial batches are not
    (tmp_path / "b.jsonl").write_text("\n".join(good[10:20]) + "\n")
    prepare_data(inputs, tmp_path / "out", tok, batch_size=3, progress=False)
    prepare_data(inputs, tmp_path / "fresh", tok, batch_size=3, progress=False)
    assert (tmp_path / "out" / "tokens-00000.bin").read_bytes() == (
        tmp_path / "fresh" / "tokens-00000.bin"
    ).read_bytes()
    assert stream_tokens(tmp_path / "out") == expected_tokens(tok, [json.loads(g)["text"] for g in good])
    # changing an input that was already consumed is refused
    (tmp_path / "a.jsonl").write_text("\n".join(good[:9]) + "\n")
    with pytest.raises(DataError, match="holds data prepared from other inputs"):
        prepare_data(inputs, tmp_path / "out", tok, progress=False)


def test_unreadable_inputs_name_the_file(tmp_path, tok):
    with pytest.raises(DataError, match=r"missing\.txt: input file not found"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "o1", tok, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: cannot read it"):
        prepare_data([tmp_path / "latin1.txt"], tmp_path / "o2", tok, progress=False)
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected an object with a string field 'text'"):
        prepare_data([tmp_path / "x.jsonl"], tmp_path / "o3", tok, progress=False)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read it"):
        prepare_data([tmp_path / "bad.parquet"], tmp_path / "o4", tok, progress=False)
    with pytest.raises(DataError, match="unknown embedded corpus 'nope'"):
        list(read_documents("embedded:nope"))


def test_token_stream_checks(tmp_path, tok, real_tokenizer_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    prepare_data([tmp_path / "a.txt"], tmp_path / "out", tok, progress=False)
    other = LlamaTokenizerFast(vocab_file=real_tokenizer_path)
    from training.data import tokenizer_fingerprint

    with pytest.raises(DataError, match="prepared with another tokenizer"):
        TokenStream(tmp_path / "out", expected_tokenizer=tokenizer_fingerprint(other))
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        prepare_data([tmp_path / "a.txt"], tmp_path / "out", other, progress=False)
    shard = tmp_path / "out" / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"tokens-00000\.bin: missing or truncated"):
        TokenStream(tmp_path / "out")


class ArrayStream:
    """A TokenStream over an in-memory array (the sampler only needs len() and window())."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.data = np.arange(offset, offset + n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.data[start : start + length]


def make_mixture(weights=(0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02), seq=8, seed=0, sizes=None):
    sizes = sizes or [8 * 50 + 1] * len(weights)
    streams = [(f"s{k}", ArrayStream(n, offset=k * 10**6), w) for k, (n, w) in enumerate(zip(sizes, weights))]
    train, val = split_sources(streams, seq, 0.0)
    return PackedMixture(train, seq, seed)


def test_mixture_follows_the_weights_of_table_1():
    weights = (0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02)
    mix = make_mixture(weights, sizes=[8 * 1000 + 1] * 7)
    n = 60_000
    counts = Counter(mix.next_draw()[0] for _ in range(n))
    for k, w in enumerate(weights):
        observed = counts[k] / n
        assert abs(observed - w) < 4 * np.sqrt(w * (1 - w) / n) + 1e-3, (k, observed, w)
    # epochs follow from weight and size: a small heavily weighted source repeats
    mix = make_mixture((0.5, 0.5), sizes=[8 * 100 + 1, 8 * 10_000 + 1])
    for _ in range(2000):
        mix.next_draw()
    epochs = mix.epochs()
    assert 9 < epochs["s0"] < 11 and 0.08 < epochs["s1"] < 0.12


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    mix = make_mixture((1.0,), sizes=[8 * 97 + 1])
    first = [mix.next_draw()[1] for _ in range(97)]
    second = [mix.next_draw()[1] for _ in range(97)]
    assert sorted(first) == sorted(second) == [8 * k for k in range(97)]
    assert first != second and first != sorted(first)
    again = make_mixture((1.0,), sizes=[8 * 97 + 1])
    assert [again.next_draw()[1] for _ in range(97)] == first  # deterministic given the seed
    other = make_mixture((1.0,), sizes=[8 * 97 + 1], seed=1)
    assert [other.next_draw()[1] for _ in range(97)] != first


def test_loader_restores_its_exact_position():
    mix = make_mixture()
    loader = PretrainLoader(mix, micro_batch=2, accumulation=3, world=1, rank=0)
    for _ in range(5):
        loader.next_step()
    state = json.loads(json.dumps(loader.state_dict()))  # it survives a JSON round trip
    expected = [[b.tolist() for b in loader.next_step()] for _ in range(4)]
    restored = PretrainLoader(make_mixture(), micro_batch=2, accumulation=3, world=1, rank=0)
    restored.load_state_dict(state)
    assert [[b.tolist() for b in restored.next_step()] for _ in range(4)] == expected
    with pytest.raises(DataError, match="belongs to another mixture"):
        PretrainLoader(make_mixture(seed=5), 2, 3, 1, 0).load_state_dict(state)


def test_ranks_split_the_global_batch_without_overlap():
    single = PretrainLoader(make_mixture(), micro_batch=2, accumulation=4, world=1, rank=0)
    ranks = [PretrainLoader(make_mixture(), micro_batch=2, accumulation=2, world=2, rank=r) for r in range(2)]
    for _ in range(3):
        whole = [row.tolist() for b in single.next_step() for row in b]
        parts = [[row.tolist() for b in loader.next_step() for row in b] for loader in ranks]
        assert not {tuple(r) for r in parts[0]} & {tuple(r) for r in parts[1]}
        assert sorted(parts[0] + parts[1]) == sorted(whole)
        # micro-step a of rank r holds draws (a * world + r) * micro ...: interleaved like the single process
        assert parts[0][:2] == whole[:2] and parts[1][:2] == whole[2:4]


def test_sequences_are_shifted_windows_and_validation_is_held_out():
    streams = [("a", ArrayStream(1001), 1.0)]
    train, val = split_sources(streams, 10, 0.1)
    assert (train[0].begin, train[0].end, val[0].begin, val[0].end) == (0, 901, 901, 1001)
    mix = PackedMixture(train, 10, 0)
    for _ in range(200):
        s, off = mix.next_draw()
        window = mix.read(s, off)
        assert len(window) == 11 and window[-1] < 901 and (np.diff(window) == 1).all()
    with pytest.raises(DataError, match="too few for seq_length"):
        split_sources([("tiny", ArrayStream(20), 1.0)], 16, 0.5)
