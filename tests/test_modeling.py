"""The model against outside references: stock transformers Llama and an independent Meta-style forward."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config, twin_models
from meta_reference import meta_forward, meta_to_hf_state_dict, random_meta_weights
from transformers import DynamicCache, StaticCache

from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max abs error {err:.3g} vs scale {scale:.3g}"


def test_logits_match_stock_transformers():
    ours, stock = twin_models()
    ids = torch.randint(0, 512, (3, 37))
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
    assert a.shape == (3, 37, 512)
    assert_rel_close(a, b)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        assert_rel_close(ours(ids, labels=labels).loss, stock(ids, labels=labels).loss)


@pytest.mark.parametrize("n_heads", [4, 8])
def test_logits_match_meta_style_forward(n_heads):
    dim, n_layers, vocab = 64, 2, 300
    cfg = LlamaConfig(
        hidden_size=dim,
        num_attention_heads=n_heads,
        num_hidden_layers=n_layers,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    meta = random_meta_weights(dim, n_layers, n_heads, vocab, cfg.intermediate_size, seed=n_heads)
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(meta_to_hf_state_dict(meta, n_layers, n_heads), strict=True)
    assert not missing and not unexpected
    tokens = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).logits
    assert_rel_close(ours, meta_forward(meta, tokens, n_layers, n_heads))


def test_without_permutation_the_meta_reference_disagrees():
    """Guards the reference itself: skipping the q/k permutation must be detected."""
    dim, n_layers, n_heads, vocab = 64, 1, 4, 100
    cfg = LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_hidden_layers=n_layers, vocab_size=vocab)
    meta = random_meta_weights(dim, n_layers, n_heads, vocab, cfg.intermediate_size)
    hf = meta_to_hf_state_dict(meta, n_layers, n_heads)
    hf["model.layers.0.self_attn.q_proj.weight"] = meta["layers.0.attention.wq.weight"]
    hf["model.layers.0.self_attn.k_proj.weight"] = meta["layers.0.attention.wk.weight"]
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(hf)
    tokens = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        diff = (model(tokens).logits - meta_forward(meta, tokens, n_layers, n_heads)).abs().max()
    assert diff > 1e-3


def test_architecture_matches_paper():
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg)
    names = dict(model.named_parameters())
    assert not [n for n in names if n.endswith(".bias")], "LLaMA has no biases"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "embeddings are untied"
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + s + ".weight"
            for s in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            )
        }
    assert set(model.state_dict()) == expected
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert LlamaForCausalLM._no_split_modules == ["LlamaDecoderLayer"]
    assert cfg.base_model_tp_plan["layers.*.self_attn.q_proj"] == "colwise"
    assert cfg.base_model_tp_plan["layers.*.mlp.down_proj"] == "rowwise"


def test_greedy_sample_and_beam_generation_match_stock():
    ours, stock = twin_models(seed=3)
    prompt = torch.randint(3, 512, (1, 7))
    kw = dict(max_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, do_sample=False, **kw), stock.generate(prompt, do_sample=False, **kw))
    torch.manual_seed(5)
    a = ours.generate(prompt, do_sample=True, top_k=50, **kw)
    torch.manual_seed(5)
    b = stock.generate(prompt, do_sample=True, top_k=50, **kw)
    assert torch.equal(a, b)
    beam = dict(num_beams=3, do_sample=False, **kw)
    assert torch.equal(ours.generate(prompt, **beam), stock.generate(prompt, **beam))


def test_cache_matches_full_forward_and_no_cache_generation():
    ours, _ = twin_models(seed=4)
    ids = torch.randint(3, 512, (2, 20))
    with torch.no_grad():
        full = ours(ids).logits
        cache = DynamicCache(config=ours.config)
        out = ours(ids[:, :12], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(12, 20):
            out = ours(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_rel_close(torch.cat(steps, dim=1), full, rel=1e-5)
    prompt = ids[:1, :6]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, use_cache=True, **kw), ours.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_argument_under_either_name_matches_stock(name):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; ours takes both, and stepping through a cache
    gives the stock model's logits (stock called with the installed version's own name)."""
    ours, stock = twin_models(seed=7)
    stock_name = "cache" if "cache" in inspect.signature(stock.forward).parameters else "past_key_values"
    ids = torch.randint(3, 512, (2, 9))
    with torch.no_grad():
        a = ours(ids[:, :5], **{name: DynamicCache(config=ours.config)}, use_cache=True)
        b = stock(ids[:, :5], **{stock_name: DynamicCache(config=stock.config)}, use_cache=True)
        a_cache, b_cache = getattr(a, stock_name), getattr(b, stock_name)  # the installed version's field
        assert a_cache.get_seq_length() == 5
        a_next = ours(ids[:, 5:], **{name: a_cache}, use_cache=True).logits
        b_next = stock(ids[:, 5:], **{stock_name: b_cache}, use_cache=True).logits
    assert_rel_close(a_next, b_next)
    with pytest.raises(ValueError, match="same argument"):
        ours(ids, cache=DynamicCache(config=ours.config), past_key_values=DynamicCache(config=ours.config))


def test_static_cache_generation_matches_dynamic():
    ours, _ = twin_models(seed=5)
    prompt = torch.randint(3, 512, (2, 6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    dynamic = ours.generate(prompt, **kw)
    static = ours.generate(prompt, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    cache = StaticCache(config=ours.config, max_cache_len=32)
    with torch.no_grad():
        logits = ours(prompt, past_key_values=cache, use_cache=True).logits
    assert_rel_close(logits, ours(prompt).logits)


def test_eager_and_sdpa_agree():
    ours, _ = twin_models(seed=6)
    ids = torch.randint(0, 512, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    results = {}
    for impl in ("eager", "sdpa"):
        ours.set_attn_implementation(impl)
        assert ours.config._attn_implementation == impl
        with torch.no_grad():
            results[impl] = (ours(ids).logits, ours(ids, attention_mask=mask).logits[:, 9:])
    assert_rel_close(results["eager"][0], results["sdpa"][0])
    assert_rel_close(results["eager"][1], results["sdpa"][1])


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_batch_equals_unpadded_rows(impl):
    ours, _ = twin_models(seed=7)
    ours.set_attn_implementation(impl)
    rows = [torch.randint(3, 512, (n,)) for n in (5, 11, 8)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            single = ours(r[None]).logits[0]
            assert_rel_close(batched[i, -len(r) :], single, rel=1e-4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    gen = ours.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        single = ours.generate(r[None], **kw)[0]
        assert torch.equal(gen[i, ids.shape[1] :], single[len(r) :])


def test_right_padding_and_explicit_position_ids():
    ours, _ = twin_models(seed=8)
    rows = [torch.randint(3, 512, (n,)) for n in (4, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits
        assert_rel_close(out[0, :4], ours(rows[0][None]).logits[0], rel=1e-4)
        # packed rows: two documents in one sequence, positions restart at the second one
        packed = torch.cat(rows)[None]
        pos = torch.cat([torch.arange(4), torch.arange(9)])[None]
        ours.set_attn_implementation("sdpa")
        p = ours(packed, position_ids=pos, use_cache=False).logits[0]
    assert_rel_close(p[:4], ours(rows[0][None]).logits[0], rel=1e-4)
    assert_rel_close(p[4:], ours(rows[1][None]).logits[0], rel=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 512, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-5, atol=1e-6)


def test_hidden_states_attentions_and_logits_to_keep():
    ours, stock = twin_models(seed=9)
    ours.set_attn_implementation("eager")
    stock.set_attn_implementation("eager")
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        out = ours(ids, output_hidden_states=True, output_attentions=True)
        ref = stock(ids, output_hidden_states=True, output_attentions=True)
        last = ours(ids, logits_to_keep=1).logits
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert_rel_close(a, b)
    assert out.attentions[0].shape == (1, 4, 10, 10)
    assert_rel_close(out.attentions[1], ref.attentions[1])
    assert last.shape == (1, 1, 512)
    assert_rel_close(last[0, 0], out.logits[0, -1])


def test_sequence_classification_pools_last_real_token():
    torch.manual_seed(0)
    cfg = tiny_config(num_labels=3)
    clf = LlamaForSequenceClassification(cfg).eval()
    base = LlamaModel(cfg).eval()
    base.load_state_dict(clf.model.state_dict())
    rows = [torch.randint(3, 512, (n,)) for n in (6, 10)]
    ids, mask = _left_pad(rows)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = clf(ids, attention_mask=mask, labels=labels)
        for i, r in enumerate(rows):
            h = base(r[None]).last_hidden_state[0, -1]
            assert_rel_close(out.logits[i], clf.score(h))
    assert out.logits.shape == (2, 3)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    assert_rel_close(out.loss, expected)


def test_model_package_imports_nothing_from_training_or_distribution():
    forbidden = ("training", "convert", "torch.distributed", "accelerate", "deepspeed", "peft", "benchmarks")
    for path in sorted(Path(REPO_ROOT, "modeling_llama").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative imports stay inside the (copyable) package
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert not any(mod == f or mod.startswith(f + ".") for f in forbidden), f"{path.name} imports {mod}"


def test_embeddings_are_untied_unless_the_config_ties_them():
    untied = LlamaForCausalLM(tiny_config())
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    tied = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in tied.parameters()) == tied.config.num_parameters()


def test_device_map_never_splits_a_decoder_layer(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=4))
    sizes = accelerate.utils.compute_module_sizes(model)
    budget = sizes[""] // 3
    device_map = accelerate.infer_auto_device_map(
        model,
        max_memory={0: budget, 1: budget, "cpu": sizes[""]},
        no_split_module_classes=model._no_split_modules,
    )
    assert len(set(device_map.values())) > 1, device_map
    for name in device_map:  # entries are whole layers (or coarser), never parts of one
        assert not any(name.startswith(f"model.layers.{i}.") for i in range(4)), name
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, device_map="auto")
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA device")
def test_flash_attention_2_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    ours, _ = twin_models(seed=12)
    ours = ours.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        ref = ours(ids).logits
        ours.set_attn_implementation("flash_attention_2")
        out = ours(ids).logits
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
