"""The quick generation demo (python -m training.demo) end to end."""

from __future__ import annotations

from training.demo import main


def test_demo_builds_saves_reloads_and_generates(tmp_path, capsys):
    assert (
        main(
            [
                "--output_dir",
                str(tmp_path / "demo"),
                "--max_new_tokens",
                "4",
                "--prompt",
                "Hello",
                "--prompt",
                "Once upon a time",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "reloaded through pipeline(): LlamaForCausalLM from transformers_modules." in out
    assert "--- 'Hello'" in out and "--- 'Once upon a time'" in out and "streaming the first prompt" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file() and (tmp_path / "demo" / "README.md").is_file()
    assert main(["--tokenizer", str(tmp_path / "missing.model")]) == 2
    assert "tokenizer file" in capsys.readouterr().err
