"""convert/: Meta's release layout <-> Hub folders, against an independent Meta-style forward; bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from conftest import REPO_ROOT, FakeHub
from meta_reference import meta_forward
from safetensors.torch import load_file

from convert.convert_hf_to_llama import convert_hf_to_llama
from convert.convert_hf_to_llama import main as reverse_main
from convert.convert_llama_weights_to_hf import convert_llama_to_hf, main
from convert.synthetic import write_meta_checkpoint
from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

DIM, LAYERS = 64, 2


def make_release(root: Path, tokenizer: str, n_shards: int, n_heads: int = 4, size: str = "tiny", **kw) -> dict:
    return write_meta_checkpoint(
        root, size, dim=DIM, n_layers=LAYERS, n_heads=n_heads, n_shards=n_shards, tokenizer_model=tokenizer, **kw
    )


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(("n_shards", "n_heads"), [(1, 4), (2, 4), (4, 8)])
def test_converted_model_matches_meta_forward(tmp_path, real_tokenizer_path, n_shards, n_heads):
    sd = make_release(tmp_path / "meta", real_tokenizer_path, n_shards, n_heads=n_heads, seed=n_shards)
    out = tmp_path / "hf"
    assert (
        main(
            [
                "--input_dir",
                str(tmp_path / "meta"),
                "--model_size",
                "tiny",
                "--output_dir",
                str(out),
                "--max_shard_size",
                "3MB",
                "--verify",
                "--no_progress",
            ]
        )
        == 0
    )
    tokens = torch.randint(0, 32000, (2, 21), generator=torch.Generator().manual_seed(0))
    reference = meta_forward({k: v.float() for k, v in sd.items()}, tokens, LAYERS, n_heads)
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stock = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(stock) is transformers.LlamaForCausalLM
    with torch.no_grad():
        for model in (ours, stock):
            torch.testing.assert_close(model(tokens).logits, reference, rtol=1e-5, atol=1e-5)


def test_output_folder_contents(tmp_path, real_tokenizer_path):
    make_release(tmp_path / "meta", real_tokenizer_path, 2)
    out = convert_llama_to_hf(tmp_path / "meta", "tiny", tmp_path / "hf", max_shard_size="3MB", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "modeling_llama.py",
        "linear_cross_entropy.py",
        "cpu_linear.py",
        "native_build.py",
        "configuration_llama.py",
        "tokenization_llama.py",
        "tokenization_llama_fast.py",
    } <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_folder_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and "model.rotary_emb.inv_freq" not in tensors
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.float16 for t in tensors.values())  # as released
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (64, 256, 32000)
    assert config["model_type"] == "llama" and config["dtype"] == "float16"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama.LlamaForCausalLM"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    sp = spm.SentencePieceProcessor(model_file=real_tokenizer_path)
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert isinstance(tok, transformers.PreTrainedTokenizerBase) and type(tok).__name__ == "LlamaTokenizerFast"
    assert tok(" Hi 2024")["input_ids"] == [1] + sp.encode(" Hi 2024")
    assert "Converted from Meta's original `tiny` checkpoint (2 shard(s))" in (out / "README.md").read_text()
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules.")


def test_dtype_option(tmp_path, real_tokenizer_path):
    sd = make_release(tmp_path / "meta", real_tokenizer_path, 1)
    out = convert_llama_to_hf(tmp_path / "meta", "tiny", tmp_path / "hf", dtype="bfloat16", progress=False)
    tensors = load_folder_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    torch.testing.assert_close(tensors["model.norm.weight"], sd["norm.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_to_hf_to_meta_is_bit_exact(tmp_path, real_tokenizer_path, n_shards):
    make_release(tmp_path / "meta", real_tokenizer_path, n_shards, n_heads=8)
    convert_llama_to_hf(tmp_path / "meta", "tiny", tmp_path / "hf", progress=False)
    back = convert_hf_to_llama(
        tmp_path / "hf", tmp_path / "meta2", num_shards=n_shards, model_size="tiny", progress=False
    )
    original = tmp_path / "meta" / "tiny"
    assert (back / "params.json").read_text() == (original / "params.json").read_text()
    assert (tmp_path / "meta2" / "tokenizer.model").read_bytes() == (tmp_path / "meta" / "tokenizer.model").read_bytes()
    for k in range(n_shards):
        a = torch.load(original / f"consolidated.{k:02d}.pth", weights_only=True)
        b = torch.load(back / f"consolidated.{k:02d}.pth", weights_only=True, mmap=True)
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert convert_llama_to_hf(tmp_path / "meta2", "tiny", tmp_path / "hf2", verify=True, progress=False)


def test_hf_to_meta_to_hf_is_bit_exact_from_a_stock_folder(tmp_path, real_tokenizer_path):
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("tiny", num_attention_heads=8)
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_dict())).to(torch.bfloat16)
    stock.save_pretrained(tmp_path / "hf")
    LlamaTokenizerFast(vocab_file=real_tokenizer_path).save_pretrained(tmp_path / "hf")
    assert (
        reverse_main(
            [
                "--input_dir",
                str(tmp_path / "hf"),
                "--output_dir",
                str(tmp_path / "meta"),
                "--num_shards",
                "2",
                "--model_size",
                "mini",
                "--no_progress",
            ]
        )
        == 0
    )
    params = json.loads((tmp_path / "meta" / "mini" / "params.json").read_text())
    assert params == {"dim": 64, "multiple_of": 256, "n_heads": 8, "n_layers": 2, "norm_eps": 1e-06, "vocab_size": -1}
    convert_llama_to_hf(tmp_path / "meta", "mini", tmp_path / "hf2", dtype="bfloat16", verify=True, progress=False)
    a, b = load_folder_tensors(tmp_path / "hf"), load_folder_tensors(tmp_path / "hf2")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    c1 = json.loads((tmp_path / "hf" / "config.json").read_text())
    c2 = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ):
        assert c1[key] == c2[key], key


def test_push_to_hub_uploads_the_converted_folder(tmp_path, monkeypatch, real_tokenizer_path):
    hub = FakeHub.install(monkeypatch)
    make_release(tmp_path / "meta", real_tokenizer_path, 1)
    assert (
        main(
            [
                "--input_dir",
                str(tmp_path / "meta"),
                "--model_size",
                "tiny",
                "--output_dir",
                str(tmp_path / "hf"),
                "--push_to_hub",
                "me/llama-tiny",
                "--no_progress",
            ]
        )
        == 0
    )
    sent = {name for repo, name in hub.files if repo == "me/llama-tiny"}
    assert sent == {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in sent and "modeling_llama.py" in sent


def test_help_and_console_scripts():
    for module in ("convert.convert_llama_weights_to_hf", "convert.convert_hf_to_llama"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "--input_dir" in proc.stdout and "--output_dir" in proc.stdout
    setup = (REPO_ROOT / "setup.cfg").read_text()
    assert "llama-convert-to-hf = convert.convert_llama_weights_to_hf:main" in setup
    assert "llama-convert-to-meta = convert.convert_hf_to_llama:main" in setup


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def release(tmp_path, real_tokenizer_path):
    make_release(tmp_path / "meta", real_tokenizer_path, 2)
    return tmp_path / "meta"


def run_cli(release: Path, *extra: str, size: str = "tiny", out: Path | None = None) -> tuple[int, str]:
    """The CLI's main() in this process (a subprocess per case would spend seconds importing torch)."""
    out = out or release.parent / "hf"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            ["--input_dir", str(release), "--model_size", size, "--output_dir", str(out), "--no_progress", *extra]
        )
    return code, err.getvalue()


def assert_fails(release: Path, pattern: str, *extra: str, size: str = "tiny") -> None:
    import re

    code, err = run_cli(release, *extra, size=size)
    assert code != 0, err
    assert re.search(pattern, err), err
    out = release.parent / "hf"
    assert not out.exists(), "no output may be left behind"
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".hf.tmp")], "temporary folder left"


def test_missing_shard(release):
    (release / "tiny" / "consolidated.01.pth").unlink()
    assert_fails(release, r"consolidated\.01\.pth: missing \(listed in checklist\.chk\)")
    (release / "tiny" / "checklist.chk").unlink()
    shutil.move(release / "tiny" / "consolidated.00.pth", release / "tiny" / "consolidated.01.pth")
    assert_fails(release, r"consolidated\.00\.pth: missing shard 0 of 2")


def test_truncated_and_corrupt_shards(release):
    shard = release / "tiny" / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_fails(release, r"consolidated\.01\.pth: not a readable PyTorch checkpoint \(truncated or corrupt\?\)")
    shard.write_bytes(os.urandom(4096))
    assert_fails(release, r"consolidated\.01\.pth: not a readable PyTorch checkpoint")
    shard.write_bytes(data)
    assert run_cli(release)[0] == 0


def test_verify_detects_a_changed_byte(release):
    shard = release / "tiny" / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[-5000] ^= 0xFF  # inside the tensor data: still loadable, but not what Meta shipped
    shard.write_bytes(bytes(data))
    assert_fails(release, r"consolidated\.00\.pth: md5 [0-9a-f]{32} does not match checklist\.chk", "--verify")


def test_pickle_that_would_run_code_is_refused(release, tmp_path):
    marker = tmp_path / "pwned"
    payload = textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        sd = torch.load("{release}/tiny/consolidated.01.pth", weights_only=True)
        sd["norm.weight"] = Evil()
        torch.save(sd, "{release}/tiny/consolidated.01.pth")
    """)
    subprocess.run([sys.executable, "-c", payload], check=True)
    assert_fails(release, r"consolidated\.01\.pth: refusing to load: it holds pickled objects other than tensors")
    assert not marker.exists(), "the checkpoint's code ran"


def test_shapes_that_disagree(release):
    path = release / "tiny" / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["layers.1.attention.wq.weight"] = sd["layers.1.attention.wq.weight"][:-2]
    torch.save(sd, path)
    (release / "tiny" / "checklist.chk").unlink()
    assert_fails(
        release,
        r"consolidated\.01\.pth: tensor 'layers\.1\.attention\.wq\.weight' has shape \(30, 64\), "
        r"expected \(32, 64\)",
    )


def test_params_json_problems(release):
    params_path = release / "tiny" / "params.json"
    params = json.loads(params_path.read_text())
    params_path.write_text("{not json")
    assert_fails(release, r"params\.json: not valid JSON")
    params_path.write_text(json.dumps({k: v for k, v in params.items() if k != "n_layers"}))
    assert_fails(release, r"params\.json: missing required field 'n_layers'")
    params_path.write_text(json.dumps({**params, "dim": "64"}))
    assert_fails(release, r"params\.json: field 'dim' has the wrong type")
    params_path.write_text(json.dumps({**params, "dim": 128}))
    assert_fails(release, r"tensor 'tok_embeddings\.weight' has shape \(32000, 32\), expected \(32000, 64\)")
    params_path.write_text(json.dumps({**params, "n_heads": 5}))
    assert_fails(release, r"params\.json: does not describe a valid LLaMA: hidden_size \(64\) must be divisible")
    params_path.write_text(json.dumps({**params, "vocab_size": 1000}))
    assert_fails(release, r"tok_embeddings has 32000 rows but the vocabulary size is 1000 \(params\.json\)")


def test_missing_tokenizer_and_unknown_size(release):
    assert_fails(release, r"no such model folder; --model_size must be 7B, 13B, 30B, 33B, 65B .*found: tiny", size="8B")
    (release / "tokenizer.model").unlink()
    assert_fails(release, r"tokenizer\.model: tokenizer\.model not found")


def test_known_size_is_cross_checked(release):
    shutil.move(release / "tiny", release / "7B")
    assert_fails(release, r"7B/params\.json: dim/n_heads/n_layers = 64/4/2 do not match LLaMA-7B", size="7B")


def test_output_is_atomic_and_not_overwritten_by_accident(release):
    out = release.parent / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run_cli(release)
    assert code != 0 and "folder is not empty; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    # a failing conversion with --overwrite leaves the old folder intact
    (release / "tiny" / "consolidated.01.pth").write_bytes(b"garbage")
    code, err = run_cli(release, "--overwrite")
    assert code != 0 and (out / "keep.txt").read_text() == "user data"
    (release / "tiny" / "checklist.chk").unlink()


def test_disk_full_removes_partial_output(release):
    # RLIMIT_FSIZE makes the kernel refuse writes past 1 MB (EFBIG), as a full disk refuses them (ENOSPC).
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from convert.convert_llama_weights_to_hf import main
        sys.exit(main(["--input_dir", "{release}", "--model_size", "tiny", "--output_dir", "{release.parent / "hf"}",
                       "--no_progress"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "could not write the output (File too large); partial output removed" in proc.stderr
    assert not (release.parent / "hf").exists()
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".hf.tmp")]


def test_reverse_converter_bad_input(tmp_path, capsys, real_tokenizer_path):
    def run(*extra: str) -> str:
        code = reverse_main(
            ["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "o"), "--no_progress", *extra]
        )
        assert code == 1
        assert not (tmp_path / "o").exists()
        return capsys.readouterr().err

    (tmp_path / "hf").mkdir()
    assert "config.json: not found; --input_dir must be a Hugging Face model folder" in run()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type is 'gpt2', not 'llama'" in run()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_preset("tiny")).save_pretrained(tmp_path / "hf")
    assert "tokenizer.model: not found; Meta's layout needs the SentencePiece tokenizer.model" in run()
    shutil.copyfile(real_tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    assert "hidden_size 64 is not divisible by --num_shards 3" in run("--num_shards", "3")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"junk")
    assert "model.safetensors: not a readable safetensors file" in run()
