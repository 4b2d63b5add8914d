"""Shared fixtures: the real LLaMA tokenizer, a tokenizer trained here, tiny configs, stock-transformers twins."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Before torch, as every training entry point starts: on AMD CPUs this switches MKL to its Intel kernels
# (training.mkl_amd), so that results computed here and in the training subprocesses the tests launch come from the
# same kernels (exact-resume and multi-process tests compare them bit for bit).
import training  # noqa: E402, F401

# isort: split
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_TOKENIZER = FIXTURES / "tokenizer.model"

# A few lines in scripts the corpus of the project's own files lacks, so the trained vocabulary covers them.
EXTRA_CORPUS = """\
Die Straße ist 1234 Meter lang. Übung macht den Meister.
Le café coûte 3,50 € à Paris ; naïve façon.
日本語のテキストを少し書きます。東京は大きい都市です。
Русский текст для токенизатора. Привет, мир!
Emoji 😀👍🏽 and symbols ∑ ∫ √ ≠ ≤ ≥.
    indented  line\twith\ttabs   and   runs     of spaces
"""


def run_python_json(code: str, *args: str, cwd: Path, env: dict[str, str]) -> dict:
    """Run ``python -c code *args`` in a fresh interpreter (cwd, env as given); its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def project_corpus(tmp_dir: Path) -> Path:
    """A ~200 kB corpus: the repository's own source and docs plus a few multilingual lines."""
    parts = [p.read_text(encoding="utf-8") for p in sorted(REPO_ROOT.rglob("*.py")) if ".venv" not in p.parts]
    parts += [p.read_text(encoding="utf-8") for p in sorted(REPO_ROOT.glob("*.md"))]
    path = tmp_dir / "corpus.txt"
    path.write_text("\n".join(parts) + "\n" + EXTRA_CORPUS * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def real_tokenizer_path() -> str:
    assert REAL_TOKENIZER.is_file(), "tests/fixtures/tokenizer.model (Meta's LLaMA tokenizer) is missing"
    return str(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def trained_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece BPE trained in the test session with the paper's settings (training.train_tokenizer)."""
    from training.train_tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("trained_tok")
    return train_tokenizer([project_corpus(tmp)], tmp / "tok", vocab_size=1000, num_threads=2)


def tiny_config(**overrides):
    from modeling_llama import LlamaConfig

    kwargs = {"vocab_size": 512, "max_position_embeddings": 128}
    kwargs.update(overrides)
    return LlamaConfig.from_preset("tiny", **kwargs)


def stock_config(config):
    """The stock transformers.LlamaConfig with the same architecture as our config."""
    import transformers

    return transformers.LlamaConfig.from_dict(config.to_dict())


def op_calls(fn, op: str) -> int:
    """How many times ``fn()`` calls the operator ``op`` (e.g. ``"llama_hf::small_batch_linear"``), read from the
    profiler's op events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


def twin_models(seed: int = 0, **overrides):
    """Our tiny model and a stock transformers Llama holding the same weights, both in eval mode."""
    import transformers

    from modeling_llama import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    ours = LlamaForCausalLM(cfg).eval()
    stock = transformers.LlamaForCausalLM(stock_config(cfg)).eval()
    missing, unexpected = stock.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, stock


class FakeHub:
    """The network edge of huggingface_hub: records what create_repo/create_commit would send."""

    def __init__(self):
        self.repos, self.files = [], {}

    @classmethod
    def install(cls, monkeypatch) -> FakeHub:
        """Replace the calls that would reach the network (repo creation, commits, card download)."""
        import huggingface_hub

        hub = cls()
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(*a, **k))
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, *a, **k: hub.create_commit(*a, **k))
        monkeypatch.setattr(huggingface_hub.ModelCard, "load", staticmethod(hub.load_card))
        return hub

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        from huggingface_hub import CommitInfo

        for op in operations:
            src = op.path_or_fileobj
            data = Path(src).read_bytes() if isinstance(src, str) else src
            self.files[(repo_id, op.path_in_repo)] = data
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    def load_card(self, repo_id, **kwargs):
        from huggingface_hub import ModelCard
        from huggingface_hub.errors import EntryNotFoundError

        if (repo_id, "README.md") not in self.files:
            raise EntryNotFoundError("README.md not found")
        return ModelCard(self.files[(repo_id, "README.md")].decode())
