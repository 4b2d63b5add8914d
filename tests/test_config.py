"""LlamaConfig: paper presets, derived sizes, validation errors, compatibility with stock transformers."""

from __future__ import annotations

import pytest
import transformers

from modeling_llama import PRESETS, LlamaConfig, get_preset, llama_ffn_dim

# Table 2 of the paper (dimension, heads, layers, learning rate, tokens) and the exact counts from Meta's weights.
PAPER = {
    "7B": (4096, 32, 32, 3.0e-4, 1.0e12, 11008, 6_738_415_616, "6.7B"),
    "13B": (5120, 40, 40, 3.0e-4, 1.0e12, 13824, 13_015_864_320, "13.0B"),
    "33B": (6656, 52, 60, 1.5e-4, 1.4e12, 17920, 32_528_943_616, "32.5B"),
    "65B": (8192, 64, 80, 1.5e-4, 1.4e12, 22016, 65_285_660_672, "65.2B"),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets(name):
    dim, heads, layers, lr, tokens, ffn, n_params, printed = PAPER[name]
    cfg = LlamaConfig.from_preset(name)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (dim, heads, layers)
    assert cfg.intermediate_size == ffn == llama_ffn_dim(dim, 256)
    assert cfg.num_parameters() == n_params
    # The paper truncates to one decimal (65.28B is printed 65.2B).
    assert f"{int(n_params / 1e8) / 10:.1f}B" == printed
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps) == (32000, 2048, 1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.rope_theta) == (1, 2, None, 10000.0)
    assert cfg.tie_word_embeddings is False
    preset = get_preset(name)
    assert preset.peak_learning_rate == lr
    assert preset.train_tokens == tokens
    assert preset.batch_size_tokens == 4 * 1024 * 1024 == 2048 * 2048


def test_30b_is_an_alias_of_33b_and_lookup_errors():
    assert PRESETS["30B"] is PRESETS["33B"]
    assert get_preset("7b") is PRESETS["7B"]
    assert LlamaConfig.from_preset("30B").to_dict() == LlamaConfig.from_preset("33B").to_dict()
    with pytest.raises(ValueError, match="Unknown LLaMA preset '8B'.*7B"):
        get_preset("8B")


def test_small_presets_build_and_overrides_apply():
    for name in ("tiny", "small", "100M", "1B"):
        assert LlamaConfig.from_preset(name).num_parameters() > 0
    cfg = LlamaConfig.from_preset("tiny", vocab_size=1000, num_hidden_layers=3)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (1000, 3, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"hidden_size": 100, "num_attention_heads": 3},
            "hidden_size \\(100\\) must be divisible by num_attention_heads",
        ),
        ({"hidden_size": 66, "num_attention_heads": 6}, "head_dim .* = 11 is odd"),
        ({"num_key_value_heads": 5}, "num_key_value_heads \\(5\\) must be a positive divisor"),
        ({"hidden_act": "gelu"}, "hidden_act='silu'"),
        ({"attention_bias": True}, "no biases"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be > 0"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
        ({"eos_token_id": 40000}, "eos_token_id=40000 is outside the vocabulary"),
        ({"head_dim": 32}, "head_dim \\(32\\) x num_attention_heads"),
    ],
)
def test_invalid_configs_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_config_json_is_read_identically_by_stock_transformers(tmp_path):
    ours = LlamaConfig.from_preset("13B")
    ours.save_pretrained(tmp_path)
    stock = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(stock) is transformers.LlamaConfig
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "head_dim",
    ):
        assert getattr(stock, key) == getattr(ours, key), key
    assert stock.rope_parameters["rope_theta"] == 10000.0
    # and a stock config (with the legacy top-level rope_theta) reads into ours
    legacy = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=2
    ).to_dict()
    legacy.pop("rope_parameters", None)
    legacy["rope_theta"] = 10000.0
    back = LlamaConfig.from_dict(legacy)
    assert (back.intermediate_size, back.rope_theta, back.head_dim) == (688, 10000.0, 64)
