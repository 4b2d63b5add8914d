"""Instruction data for finetuning (the paper's LLaMA-I): records, prompt templates, tokenization, collators.

Records are Alpaca-style ``{"instruction", "input", "output"}`` (``input`` optional) or prompt/response pairs
``{"prompt", "response"}``, in JSON (a list) or JSONL files. A template turns a record into a prompt; the model
learns only the response: prompt tokens get label -100, and EOS is appended to every response and is a label, so
a finetuned model stops by itself. LLaMA has no pad token: batches are padded with ``<unk>`` (id 0), never with
EOS, and padded positions carry label -100.

Packing (``packing=True``) concatenates examples into one row and passes ``position_ids`` that restart at 0 for
each example (transformers' ``DataCollatorWithFlattening``). The model turns those positions into a block-diagonal
causal mask (``transformers.masking_utils``), so examples never attend to each other and each is scored exactly as
alone; the first label of every example is -100, so no token is trained to predict the next example.

``generate_instructions`` writes a small synthetic instruction set (arithmetic, word games, simple facts) whose
answers are computed, so tests and the demo need no external, possibly non-commercial, data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TEMPLATES",
    "PromptTemplate",
    "load_records",
    "tokenize_example",
    "SFTCollator",
    "generate_instructions",
]


class PromptTemplate:
    """A prompt format: ``with_input`` and ``no_input`` strings with ``{instruction}`` / ``{input}`` fields."""

    def __init__(self, with_input: str, no_input: str | None = None, name: str = "custom") -> None:
        self.with_input, self.no_input, self.name = with_input, no_input or with_input, name

    def format(self, record: dict[str, Any]) -> tuple[str, str]:
        """(prompt, response) of a record."""
        if "prompt" in record and "response" in record:
            return str(record["prompt"]), str(record["response"])
        if "instruction" not in record or "output" not in record:
            raise ValueError("a record needs instruction/output (Alpaca) or prompt/response fields")
        extra = str(record.get("input") or "").strip()
        template = self.with_input if extra else self.no_input
        return template.format(instruction=str(record["instruction"]).strip(), input=extra), str(record["output"])


TEMPLATES = {
    # Stanford Alpaca's prompt format (github.com/tatsu-lab/stanford_alpaca).
    "alpaca": PromptTemplate(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        name="alpaca",
    ),
    # A bare format for small models and quick experiments.
    "plain": PromptTemplate("{instruction}\n{input}\nAnswer: ", "{instruction}\nAnswer: ", name="plain"),
}


def get_template(spec: str) -> PromptTemplate:
    """A named template (alpaca, plain), a JSON file ``{"with_input": ..., "no_input": ...}``, or a format string."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        return PromptTemplate(data["with_input"], data.get("no_input"), name=path.stem)
    if "{instruction}" in spec:
        return PromptTemplate(spec, name="custom")
    raise ValueError(f"unknown prompt template {spec!r}: alpaca, plain, a JSON file or a string with {{instruction}}")


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records of JSON (a list of objects) and JSONL files; errors name the file and line."""
    records = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            pairs = list(enumerate(items, 1))
        else:
            pairs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        pairs.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        for where, item in pairs:
            ok = isinstance(item, dict) and (
                ("instruction" in item and "output" in item) or ("prompt" in item and "response" in item)
            )
            if not ok:
                raise ValueError(f"{path}:{where}: expected instruction/input/output or prompt/response fields")
            records.append(item)
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, paths))}")
    return records


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]] | None:
    """``input_ids`` = BOS + prompt + response + EOS, ``labels`` = -100 on BOS and the prompt.

    The text is tokenized whole (so the response tokens are the ones the model will generate after the prompt);
    the prompt's tokens are those of the longest common prefix with the prompt tokenized alone. Returns None when
    the prompt leaves no room for the response within ``max_length``; a long response is truncated (its EOS too).
    """
    full = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    n_prompt = 0
    for a, b in zip(full, alone):
        if a != b:
            break
        n_prompt += 1
    ids = full + [tokenizer.eos_token_id]
    labels = [-100] * n_prompt + ids[n_prompt:]
    if n_prompt >= max_length:
        return None
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class SFTCollator:
    """Right-pad a batch with ``pad_token_id`` (never EOS); labels padded with -100, attention mask 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------ synthetic data
_CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Poland": "Warsaw",
    "Chile": "Santiago",
}
_OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "fast": "slow",
    "open": "closed",
    "full": "empty",
    "old": "new",
    "high": "low",
    "wet": "dry",
}
_PLURALS = {
    "cat": "cats",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "city": "cities",
    "knife": "knives",
    "tooth": "teeth",
    "bus": "buses",
    "story": "stories",
    "leaf": "leaves",
}
_WORDS = [
    "garden",
    "river",
    "candle",
    "planet",
    "window",
    "silver",
    "forest",
    "castle",
    "pencil",
    "harbor",
    "meadow",
    "lantern",
    "thunder",
    "violet",
    "marble",
    "journey",
]
_PLAYS = ["Hamlet", "Macbeth", "Othello", "King Lear", "The Tempest", "Twelfth Night", "Romeo and Juliet"]


def generate_instructions(n: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-style records whose answers are computed (deterministic given ``seed``)."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    makers = []

    def add(fn):
        makers.append(fn)
        return fn

    @add
    def arithmetic():
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if rng.random() < 0.5:
            return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        a, b = max(a, b), min(a, b)
        return {"instruction": f"What is {a} minus {b}?", "input": "", "output": f"{a} minus {b} is {a - b}."}

    @add
    def reverse():
        w = rng.choice(_WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}

    @add
    def upper():
        words = rng.sample(_WORDS, 3)
        sentence = f"The {words[0]} near the {words[1]} and the {words[2]}."
        return {
            "instruction": "Rewrite the sentence in capital letters.",
            "input": sentence,
            "output": sentence.upper(),
        }

    @add
    def count():
        k = rng.randint(3, 9)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(k))
        return {"instruction": "How many words are in this text?", "input": sentence, "output": f"There are {k} words."}

    @add
    def sort_numbers():
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        return {
            "instruction": "Sort these numbers from smallest to largest.",
            "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, sorted(nums))),
        }

    @add
    def opposite():
        w, o = rng.choice(list(_OPPOSITES.items()))
        return {"instruction": "Give the opposite of the word.", "input": w, "output": o}

    @add
    def capital():
        country, city = rng.choice(list(_CAPITALS.items()))
        return {
            "instruction": f"What is the capital of {country}?",
            "input": "",
            "output": f"The capital of {country} is {city}.",
        }

    @add
    def plural():
        w, p = rng.choice(list(_PLURALS.items()))
        return {"instruction": "Write the plural of the noun.", "input": w, "output": p}

    @add
    def author():
        play = rng.choice(_PLAYS)
        return {"instruction": f"Who wrote {play}?", "input": "", "output": f"William Shakespeare wrote {play}."}

    for _ in range(n):
        out.append(rng.choice(makers)())
    return out


def write_instructions(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_instructions(n, seed)))
    return path
