"""GGUF export (llama.cpp's format) read back with the gguf package: metadata, vocabulary, and tensors in Meta's
row order, compared with the original Meta-layout checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch

from convert.convert_llama_weights_to_hf import convert_llama_to_hf
from convert.export_gguf import main
from convert.synthetic import write_meta_checkpoint

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, real_tokenizer_path):
    root = tmp_path_factory.mktemp("gguf")
    sd = write_meta_checkpoint(
        root / "meta",
        "tiny",
        dim=64,
        n_layers=2,
        n_heads=8,
        n_shards=2,
        tokenizer_model=real_tokenizer_path,
        dtype=torch.float16,
    )
    hf = convert_llama_to_hf(root / "meta", "tiny", root / "hf", dtype="float32", progress=False)
    return root, sd, hf


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


def test_gguf_f32_holds_meta_weights_and_the_vocabulary(converted, real_tokenizer_path):
    root, sd, hf = converted
    out = root / "model-f32.gguf"
    assert main(["--input_dir", str(hf), "--output", str(out), "--outtype", "f32"]) == 0
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "llama"
    assert (
        field(r, "llama.embedding_length"),
        field(r, "llama.block_count"),
        field(r, "llama.feed_forward_length"),
        field(r, "llama.attention.head_count"),
        field(r, "llama.rope.dimension_count"),
    ) == (64, 2, 256, 8, 8)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, "tokenizer.ggml.model") == "llama"
    sp = spm.SentencePieceProcessor(model_file=real_tokenizer_path)
    tokens = [bytes(t).decode() for t in field(r, "tokenizer.ggml.tokens")]
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [int(t[0]) for t in field(r, "tokenizer.ggml.token_type")]
    assert types[:4] == [2, 3, 3, 6] and types.count(6) == 256  # unk, <s>, </s>, byte pieces
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert len(tensors) == 2 * 9 + 3
    # GGUF's llama rotary is Meta's interleaved one: wq/wk come back exactly as Meta released them
    pairs = {
        "token_embd.weight": "tok_embeddings.weight",
        "output.weight": "output.weight",
        "output_norm.weight": "norm.weight",
    }
    for i in range(2):
        for g, m in [
            ("attn_q", "attention.wq"),
            ("attn_k", "attention.wk"),
            ("attn_v", "attention.wv"),
            ("attn_output", "attention.wo"),
            ("ffn_gate", "feed_forward.w1"),
            ("ffn_down", "feed_forward.w2"),
            ("ffn_up", "feed_forward.w3"),
            ("attn_norm", "attention_norm"),
            ("ffn_norm", "ffn_norm"),
        ]:
            pairs[f"blk.{i}.{g}.weight"] = f"layers.{i}.{m}.weight"
    for g, m in pairs.items():
        np.testing.assert_array_equal(tensors[g], sd[m].float().numpy(), err_msg=g)


def test_gguf_f16_and_q8_0(converted):
    root, sd, hf = converted
    for outtype in ("f16", "q8_0", "bf16"):
        out = root / f"model-{outtype}.gguf"
        assert main(["--input_dir", str(hf), "--output", str(out), "--outtype", outtype]) == 0
        r = gguf.GGUFReader(out)
        t = {x.name: x for x in r.tensors}
        wq = sd["layers.0.attention.wq.weight"].float().numpy()
        got = gguf.quants.dequantize(t["blk.0.attn_q.weight"].data, t["blk.0.attn_q.weight"].tensor_type)
        got = np.asarray(got, dtype=np.float32).reshape(wq.shape)
        if outtype == "f16":
            np.testing.assert_array_equal(got, wq)  # the checkpoint was fp16 to begin with
        else:
            np.testing.assert_allclose(got, wq, atol=2e-3, rtol=2e-2)
        assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_gguf_errors(converted, tmp_path, capsys):
    root, _, hf = converted
    out = root / "exists.gguf"
    out.write_bytes(b"x")
    assert main(["--input_dir", str(hf), "--output", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--input_dir", str(tmp_path), "--output", str(tmp_path / "o.gguf")]) == 1
    assert "not a readable LLaMA config" in capsys.readouterr().err
