"""training.train_tokenizer: the paper's trainer settings, a loadable folder, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from conftest import REPO_ROOT, project_corpus
from sentencepiece import sentencepiece_model_pb2

from modeling_llama import LlamaTokenizer, LlamaTokenizerFast
from training.train_tokenizer import main


def test_trained_model_has_the_papers_settings(trained_tokenizer_dir):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((trained_tokenizer_dir / "tokenizer.model").read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == 2 and t.split_digits and t.byte_fallback and t.allow_whitespace_only_pieces
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert t.vocab_size == 1000 and len(proto.pieces) == 1000
    assert sum(p.type == 6 for p in proto.pieces) == 256  # every byte has a fallback piece
    sp = spm.SentencePieceProcessor(model_file=str(trained_tokenizer_dir / "tokenizer.model"))
    assert sp.encode("2024", out_type=str)[-4:] == ["2", "0", "2", "4"]


def test_folder_loads_with_both_classes_and_auto(trained_tokenizer_dir):
    from transformers import AutoTokenizer

    text = "  x = 12345  # 日本 🙂\n"
    sp = spm.SentencePieceProcessor(model_file=str(trained_tokenizer_dir / "tokenizer.model"))
    for tok in (
        LlamaTokenizer.from_pretrained(trained_tokenizer_dir),
        LlamaTokenizerFast.from_pretrained(trained_tokenizer_dir),
        AutoTokenizer.from_pretrained(trained_tokenizer_dir, trust_remote_code=True),
        AutoTokenizer.from_pretrained(trained_tokenizer_dir),
    ):
        assert tok(text)["input_ids"] == [1] + sp.encode(text)


def test_cli_jsonl_input_and_help(tmp_path):
    corpus = project_corpus(tmp_path).read_text(encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for chunk in corpus.split("\n\n"):
            f.write(json.dumps({"content": chunk}) + "\n")
    assert (
        main(
            [
                "--input",
                str(jsonl),
                "--text_key",
                "content",
                "--vocab_size",
                "600",
                "--output_dir",
                str(tmp_path / "tok"),
                "--num_threads",
                "2",
            ]
        )
        == 0
    )
    assert LlamaTokenizerFast.from_pretrained(tmp_path / "tok").vocab_size == 600
    help_ = subprocess.run(
        [sys.executable, "-m", "training.train_tokenizer", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--vocab_size" in help_.stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "missing.txt: input file not found"),
        ('{"text": "ok"}\nnot json\n', ["--vocab_size", "600"], "docs.jsonl:2: not a JSON object"),
        ('{"body": "x"}\n', ["--vocab_size", "600"], "docs.jsonl:1: expected an object with a string field 'text'"),
        ('{"text": "tiny corpus"}\n', ["--vocab_size", "100"], "vocab_size=100 is too small"),
        ('{"text": "tiny corpus"}\n', ["--vocab_size", "5000"], "cannot build 5000 pieces from this corpus"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, content, args, message):
    path = tmp_path / ("missing.txt" if content is None else "docs.jsonl")
    if content is not None:
        path.write_text(content)
    code = main(["--input", str(path), "--output_dir", str(tmp_path / "out"), *args])
    assert code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
