"""Hub folders: stock <-> ours, trust_remote_code without the project installed, pipeline(), push_to_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import FakeHub, run_python_json, tiny_config, twin_models
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

import modeling_llama
from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaTokenizerFast


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_tokenizer_path):
    """A Hub folder written by our save_pretrained: tiny model (real vocabulary) + real tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hub") / "tiny-llama"
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny")).eval()
    model.save_pretrained(path)
    LlamaTokenizerFast(vocab_file=real_tokenizer_path).save_pretrained(path)
    return path, model


def test_folder_contents_card_and_generation_config(folder):
    path, _ = folder
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "configuration_llama.py",
        "modeling_llama.py",
        "linear_cross_entropy.py",
        "cpu_linear.py",
        "native_build.py",
        "tokenization_llama.py",
        "tokenization_llama_fast.py",
    } <= names
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llama.LlamaForCausalLM"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_llama.LlamaConfig"
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "| 64 | 2 | 4 | 256 | 256 | 32000 |" in card
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)


def test_stock_transformers_loads_the_folder_into_its_own_classes(folder):
    path, model = folder
    stock = AutoModelForCausalLM.from_pretrained(path)
    assert type(stock) is transformers.LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["The quick brown fox", " jumps"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(stock(**ids).logits, model(**ids).logits, rtol=1e-5, atol=1e-5)
    assert tok(" jumps")["input_ids"] == [1, 29871, 432, 17204]


def test_trust_remote_code_loads_our_classes_from_the_folder(folder):
    path, model = folder
    for auto, name in ((AutoModelForCausalLM, "LlamaForCausalLM"), (AutoModel, "LlamaModel")):
        m = auto.from_pretrained(path, trust_remote_code=True)
        assert type(m).__name__ == name and type(m).__module__.startswith("transformers_modules.")
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(cfg).__module__.startswith("transformers_modules.") and cfg.multiple_of == 256
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert type(tok).__name__ == "LlamaTokenizerFast"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_llama", "training", "convert"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: project not installed)")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import modeling_llama  # noqa: F401
        raise SystemExit("the project is importable in the subprocess")
    except ModuleNotFoundError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok(" Hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    print(json.dumps({"model": type(model).__module__ + "." + type(model).__name__,
                      "tokenizer": type(tok).__module__ + "." + type(tok).__name__,
                      "ids": ids[0].tolist(), "logits": logits[0, -1, :50].tolist(), "gen": out[0].tolist()}))
    """
)


def test_trust_remote_code_in_a_process_where_the_project_is_not_installed(folder, tmp_path):
    path, model = folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = run_python_json(REMOTE_SCRIPT, str(path), cwd=tmp_path, env=env)
    assert result["model"].startswith("transformers_modules.") and result["model"].endswith(".LlamaForCausalLM")
    assert result["tokenizer"].endswith(".LlamaTokenizerFast")
    assert result["ids"] == [1, 29871, 15043, 3186]
    ids = torch.tensor([result["ids"]])
    with torch.no_grad():
        expected = model(ids).logits[0, -1, :50]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert result["gen"] == model.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist()


TWO_COPIES_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("always")
    path, order = sys.argv[1], sys.argv[2]
    with warnings.catch_warnings(record=True) as caught:
        if order == "installed first":
            from modeling_llama import cpu_linear as installed
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        (copy,) = [m for k, m in sys.modules.items()
                   if k.startswith("transformers_modules.") and k.endswith(".cpu_linear")]
        if order != "installed first":
            from modeling_llama import cpu_linear as installed
        first, second = (installed, copy) if order == "installed first" else (copy, installed)
        torch.manual_seed(0)
        x, w = torch.randn(3, 64), torch.randn(40, 64)
        # the copy imported second (which found the first's Python kernel registered) loads the C++ one first
        native = [second.native(), first.native()]
        errors = [(m.small_batch_linear(x, w) - x @ w.T).abs().max().item() for m in (first, second)]
        cpu_kernel = next(line for line in torch._C._dispatch_dump(copy._OP).splitlines() if line.startswith("CPU:"))
        with torch.no_grad():
            out = model.generate(torch.tensor([[1, 15043, 3186]]), max_new_tokens=4, do_sample=False)
    print(json.dumps({"warnings": [str(c.message) for c in caught], "native": native, "errors": errors,
                      "cpu_kernel": cpu_kernel, "gen": out[0].tolist()}))
    """
)


@pytest.mark.parametrize("order", ["installed first", "trust_remote_code copy first"])
def test_the_installed_package_and_a_trust_remote_code_copy_share_the_few_row_op(folder, tmp_path, order):
    """One process may hold the installed package and the copy trust_remote_code imports from a Hub folder: both
    use the one ``llama_hf::small_batch_linear`` op, so neither may register a second CPU kernel over the other's
    (torch then warns that it overrides one), and either copy moves the op to the C++ kernel, whichever registered the
    Python one; both compute the product."""
    path, model = folder
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TWO_COPIES_SCRIPT, str(path), order],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "registered kernel" not in proc.stderr, proc.stderr[-3000:]
    assert not [w for w in result["warnings"] if "registered kernel" in w or "Overriding" in w], result["warnings"]
    assert max(result["errors"]) < 1e-4, result["errors"]
    assert result["native"][0] == result["native"][1]  # the same library, whichever copy loads it
    if result["native"][0]:
        assert "native_build.py" not in result["cpu_kernel"], result["cpu_kernel"]  # the C++ kernel, not Python's
    ids = torch.tensor([[1, 15043, 3186]])
    assert result["gen"] == model.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()


def test_stock_saved_folder_loads_into_our_classes(tmp_path):
    ours, stock = twin_models(seed=11)
    stock.save_pretrained(tmp_path)
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)
    base = LlamaModel.from_pretrained(tmp_path)  # the base model out of a CausalLM checkpoint
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, stock.model(ids).last_hidden_state)
    half = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_auto_classes_resolve_our_config_class_without_touching_stock():
    cfg = tiny_config()
    assert type(AutoModelForCausalLM.from_config(cfg)) is LlamaForCausalLM
    assert type(AutoModel.from_config(cfg)) is LlamaModel
    stock_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1, vocab_size=100
    )
    assert type(AutoModelForCausalLM.from_config(stock_cfg)) is transformers.LlamaForCausalLM
    assert type(AutoConfig.for_model("llama")) is transformers.LlamaConfig
    assert set(modeling_llama.__all__) >= {
        "LlamaConfig",
        "LlamaModel",
        "LlamaForCausalLM",
        "LlamaTokenizer",
        "LlamaTokenizerFast",
    }


def test_pipeline_single_batched_and_streaming(folder):
    path, _ = folder
    gen = pipeline("text-generation", model=str(path), trust_remote_code=True, device="cpu")
    kw = dict(max_new_tokens=6, do_sample=False)
    prompts = ["The capital of France is", "Hi", "Once upon a time there was a"]
    single = [gen(p, **kw)[0]["generated_text"] for p in prompts]
    batched = gen(prompts, batch_size=3, **kw)
    assert [b[0]["generated_text"] for b in batched] == single
    for p, s in zip(prompts, single):
        assert s.startswith(p) and len(s) > len(p)

    class Capture(TextStreamer):
        def __init__(self, tok):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.chunks = []

        def on_finalized_text(self, text, stream_end=False):
            self.chunks.append(text)

    inputs = gen.tokenizer(prompts[0], return_tensors="pt")
    streamer = Capture(gen.tokenizer)
    out = gen.model.generate(**inputs, streamer=streamer, **kw)
    new = gen.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "".join(streamer.chunks).strip() == new.strip() and new.strip()


def test_push_to_hub_sends_the_whole_folder(monkeypatch, folder, real_tokenizer_path):
    _, model = folder
    hub = FakeHub.install(monkeypatch)
    model.push_to_hub("someone/tiny-llama")
    LlamaTokenizerFast(vocab_file=real_tokenizer_path).push_to_hub("someone/tiny-llama")
    sent = {name for repo, name in hub.files if repo == "someone/tiny-llama"}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
        "modeling_llama.py",
        "linear_cross_entropy.py",
        "cpu_linear.py",
        "native_build.py",
        "configuration_llama.py",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "tokenization_llama.py",
        "tokenization_llama_fast.py",
    } <= sent
    card = hub.files[("someone/tiny-llama", "README.md")].decode()
    assert "LLaMA-1 architecture model" in card and "pipeline_tag: text-generation" in card
    config = json.loads(hub.files[("someone/tiny-llama", "config.json")])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama.LlamaForCausalLM"
