"""Stage `eval`: the paper's evaluation protocol on a JSONL benchmark.

Protocol (paper / model card, ../shared/reference/PHI4_MINI.md): each problem is asked in the
Phi-4-mini-reasoning chat format with the suffix "Please reason step by step, and put your final
answer within \\boxed{}."; k samples per problem at temperature 0.6, top-p 0.95; each sample is
graded by Math-Verify (gold first) in the reward pool; pass@1 is the mean over problems of the
fraction of correct samples, with its standard error over problems.

Dataset shapes (as their maintainers distribute them; field names configurable):
- `math` (MATH-500, AIME): a problem field and a gold-answer field (`problem`, `answer`).
- `gpqa` (GPQA-Diamond): `Question`, `Correct Answer`, `Incorrect Answer 1..3`. The four
  choices are shuffled per problem with a fixed seed, listed as A) .. D), and the sample must
  box the right letter (the reward pool's choice mode).

Writes `workdir/eval/<name>.json` (summary + per-problem results) and prints a table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random

import jax
import numpy as np
from ml_collections import ConfigDict

from phimr_jax.data.sources import open_records
from phimr_jax.evaluation.inference import load_model_and_tokenizer, sample_questions
from phimr_jax.model.sharding import axis_rules

log = logging.getLogger(__name__)

MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
GPQA_SUFFIX = ("Please reason step by step, and put your final answer (the letter A, B, C or D "
               "of the correct choice) within \\boxed{}.")
GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3")


def load_problems(config: ConfigDict) -> tuple[list, list, str, list]:
    """(questions with the protocol suffix, gold answers, grading mode, difficulty labels or
    None per problem) from config.dataset."""
    if config.format == "math":
        fields = {"problem": config.problem_field, "answer": config.answer_field}
        if config.difficulty_field:
            fields["difficulty"] = config.difficulty_field
        source = open_records(config.dataset, fields=fields, required=("problem",))
        records = [source[i] for i in range(len(source))]
        missing = [i for i, r in enumerate(records) if r.get("answer") in (None, "")]
        if missing:
            raise ValueError(f"{len(missing)} problems of {config.dataset} have no "
                             f"{config.answer_field!r} (first: record {missing[0]})")
        suffix = "" if config.suffix == "none" else "\n" + (config.suffix or MATH_SUFFIX)
        questions = [r["problem"] + suffix for r in records]
        levels = [None if r.get("difficulty") is None else str(r["difficulty"])
                  for r in records]
        return questions, [str(r["answer"]) for r in records], "math", levels
    if config.format == "gpqa":
        source = open_records(config.dataset, fields={f: f for f in GPQA_FIELDS},
                              required=GPQA_FIELDS)
        questions, golds = [], []
        for i in range(len(source)):
            r = source[i]
            choices = [r["Correct Answer"]] + [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
            order = list(range(4))
            random.Random(config.seed * 100003 + i).shuffle(order)
            listed = "\n".join(f"{'ABCD'[j]}) {choices[c].strip()}" for j, c in enumerate(order))
            questions.append(f"{r['Question'].strip()}\n\n{listed}\n\n{config.suffix or GPQA_SUFFIX}")
            golds.append("ABCD"[order.index(0)])
        return questions, golds, "choice", [None] * len(questions)
    raise ValueError(f"format must be math or gpqa, got {config.format!r}")


def pass_at_1(correct: np.ndarray) -> tuple[float, float]:
    """(pass@1, its standard error) from a [problems, k] boolean matrix: the mean over
    problems of each problem's fraction of correct samples, SE over problems."""
    per_problem = correct.mean(axis=1)
    n = len(per_problem)
    se = float(per_problem.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(per_problem.mean()), se


def pass_at_k(correct: np.ndarray) -> float:
    """pass@k with k = the samples per problem: the fraction of problems with at least one
    correct sample. Next to pass@1 it shows what RL can sharpen: where pass@k >> pass@1 the
    model sometimes solves a problem it usually fails, and on-policy RL gets a signal."""
    return float(correct.any(axis=1).mean())


def by_difficulty(correct: np.ndarray, levels: list, metric=lambda c: float(c.mean())) -> dict:
    """{difficulty label: metric (default pass@1) over that label's problems}, for labelled
    problems only."""
    out = {}
    for level in sorted({lv for lv in levels if lv is not None}):
        rows = np.array([lv == level for lv in levels])
        out[level] = metric(correct[rows])
    return out


def run(config: ConfigDict) -> dict:
    from phimr_jax.evaluation.rewards import RewardPool

    if not config.dataset:
        raise ValueError("missing required option --config.dataset=FILE.jsonl")
    if not config.workdir:
        raise ValueError("missing required option --config.workdir=...")
    name = config.name or os.path.splitext(os.path.basename(config.dataset))[0]
    questions, golds, mode, levels = load_problems(config)
    if config.limit > 0:
        questions, golds, levels = (questions[:config.limit], golds[:config.limit],
                                    levels[:config.limit])
    model, tokenizer, mesh, rules = load_model_and_tokenizer(config)
    with jax.set_mesh(mesh), axis_rules(rules):
        res = sample_questions(model, tokenizer, questions, config)
    k = config.num_samples
    texts = [tokenizer.decode(toks[:-1] if reason == "stop" else toks)
             for toks, reason in zip(res.tokens, res.finish_reasons)]
    lengths = [len(toks) for toks in res.tokens]
    reasons = list(res.finish_reasons)
    gold_rows = [g for g in golds for _ in range(k)]
    with RewardPool(num_workers=config.grader_workers, timeout_s=config.grader_timeout_s) as pool:
        correct = pool.grade(texts, gold_rows, mode=mode)
        timeouts = pool.num_timeouts
    correct = np.asarray(correct, bool).reshape(len(questions), k)
    score, se = pass_at_1(correct)
    summary = {"name": name, "dataset": os.path.abspath(config.dataset), "problems": len(questions),
               "samples_per_problem": k, "pass@1": score, "stderr": se,
               "mean_tokens": float(np.mean(lengths)),
               "truncated": float(np.mean([r == "length" for r in reasons])),
               "grader_timeouts": int(timeouts), "temperature": config.temperature,
               "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
               "model": config.hf_dir or config.checkpoint,
               "pass@1_by_difficulty": by_difficulty(correct, levels),
               "pass@k": pass_at_k(correct),
               "pass@k_by_difficulty": by_difficulty(correct, levels, pass_at_k)}
    problems = [{"question": questions[i], "gold": golds[i],
                 "correct": correct[i].tolist(), "pass@1": float(correct[i].mean()),
                 "completions": texts[i * k:(i + 1) * k] if config.save_completions else [],
                 "num_tokens": lengths[i * k:(i + 1) * k]} for i in range(len(questions))]
    result = {"summary": summary, "problems": problems}
    if jax.process_index() == 0:
        out_dir = os.path.join(config.workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        # Written whole or not at all: the recipe reuses an existing file on its rerun, so a
        # run killed mid-write must not leave half of one.
        path = os.path.join(out_dir, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(format_table([summary]))
    return result  # what workdir/eval/<name>.json holds, on every process


def format_table(summaries: list) -> str:
    rows = ["| benchmark | problems | k | pass@1 (%) | ± SE | mean tokens | truncated |",
            "|---|---|---|---|---|---|---|"]
    for s in summaries:
        rows.append(f"| {s['name']} | {s['problems']} | {s['samples_per_problem']} | "
                    f"{100 * s['pass@1']:.1f} | {100 * s['stderr']:.1f} | "
                    f"{s['mean_tokens']:.0f} | {100 * s['truncated']:.0f}% |")
    return "\n".join(rows)
