"""A synthetic grade-school math corpus, so the demos train without downloading anything.

`generate(out_dir, n_train=..., n_heldout=..., n_fresh=...)` writes `train.jsonl`,
`heldout.jsonl` and `fresh.jsonl` (problems in neither, for RL prompts) with records
{"problem", "solution", "answer", "difficulty", "domain"}:

  difficulty 1  one-digit addition / subtraction                          (arithmetic)
  difficulty 2  two-digit addition with a carry, subtraction with a borrow (arithmetic)
  difficulty 3  two-digit x one-digit multiplication, column by column     (arithmetic)
  difficulty 4  word problems: bags (a product, then + a few more); a      (word_problem)
                shopping bill (two times-table facts, then their column sum)
  difficulty 5  (a + b) x c: a column sum, then a column product; the same (expression,
                as a word problem about friends                             word_problem)
  difficulty 6  (a + b) x c + d: level 5, then one number more (the bags'  (expression,
                last step); only with max_level=6, the hard tail            word_problem)

Levels 3-5 are chains of the steps levels 1-2 teach plus times-table facts, each written out
column by column (no multi-digit operation done in one go: every step has a one-digit right
operand, a fact or a carry), so a harder level is a longer chain of steps the model can learn
rather than a step it cannot, and the answers are
two- or three-digit numbers that a chain with a false step rarely hits by luck (the reward
only reads the boxed answer; README, "demo recipe").

The families themselves (templates, samplers, step-by-step solvers) are `demo_kinds.KINDS`.

Each solution is a short chain of thought (under 80 words; level 6 under 100) whose every
step is an exact integer operation, ending with "The answer is \\boxed{N}."; answers are
non-negative integers written as strings. Difficulty levels are drawn uniformly (training
problems: by `train_level_weights` when given, so the hard tail can be rare in the teacher's
data). Held-out problems are distinct from each other and never appear in train; train
problems are distinct too while the level has unused problems, but level 1 has only ~600
distinct problems, so large train sets repeat some easy
ones (documented simplification: repetition of one-digit sums is harmless for the demo).

`wrong_solution(record, rng)` gives the same problem solved with one deliberate slip (one
operation off by 1, 2 or 10) carried through the later steps, so the rollout looks plausible and
ends in a wrong boxed answer: rejected samples for DPO. It works from the problem text alone
(each problem template doubles as a parser), so it also works on records read back from disk.

Everything is deterministic given the seed (Python's `random.Random`, whose integer streams are
stable across Python versions).
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Iterable, Iterator, Optional

from phimr_jax.data.demo_kinds import KINDS, Calc, Kind, render
from phimr_jax.data.tokenizers import DEFAULT_SYSTEM

SLIPS = (-10, -2, -1, 1, 2, 10)  # a slipped operation's error (wrong_solution)


def _kind_of_level(rng: random.Random, level: int) -> Kind:
    return rng.choice([k for k in KINDS if k.difficulty == level])


def sample_record(rng: random.Random, level: Optional[int] = None,
                  kind: Optional[Kind] = None) -> dict:
    """One random record: a uniform difficulty (unless given), then a uniform kind (unless
    given) and template within it."""
    level = rng.randint(1, 5) if level is None else level
    kind = kind or _kind_of_level(rng, level)
    params = kind.sample(rng)
    problem = rng.choice(kind.templates).format(**params)
    return render(kind, problem, params, Calc())


def _draw(rng: random.Random, level: int, avoid: tuple[set[str], ...],
          tries: int, kind: Optional[Kind] = None) -> Optional[dict]:
    """A record of `level` whose problem is in none of `avoid` (retries keep the level and the
    kind, so rejecting repeats skews neither the difficulty spread nor the mix of kinds: a
    kind with fewer distinct problems, such as subtraction with a borrow, would otherwise lose
    its share as it fills up)."""
    kind = kind or _kind_of_level(rng, level)
    for _ in range(tries):
        record = sample_record(rng, level, kind)
        if not any(record["problem"] in s for s in avoid):
            return record
    return None


def _heldout(rng: random.Random, n: int, max_level: int = 5) -> list[dict]:
    records, seen = [], set()
    for _ in range(n):
        record = _draw(rng, rng.randint(1, max_level), (seen,), tries=1000)
        if record is None:
            raise ValueError(f"cannot draw {n} distinct held-out problems")
        seen.add(record["problem"])
        records.append(record)
    return records


def _train(rng: random.Random, n: int, heldout: set[str], max_level: int = 5,
           level_weights: tuple = ()) -> list[dict]:
    """`level_weights`: relative weight of levels 1..max_level (() = uniform)."""
    records, seen = [], set()
    levels = range(1, max_level + 1)
    for _ in range(n):
        level = rng.choices(levels, level_weights)[0] if level_weights else \
            rng.randint(1, max_level)
        record = _draw(rng, level, (seen, heldout), tries=20)
        if record is None:  # the level is saturated: allow a repeat, never a held-out problem
            record = _draw(rng, level, (heldout,), tries=1000)
        if record is None:
            raise ValueError("cannot draw train problems outside the held-out set")
        seen.add(record["problem"])
        records.append(record)
    return records


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _fresh(rng: random.Random, n: int, train: set[str], heldout: set[str],
           max_level: int = 5) -> list[dict]:
    """Problems in neither split (RL prompts the model has not been trained on), as far as the
    kind has any left; a used-up kind (one-digit sums, the 640 products) repeats train
    problems, never held-out ones, so every kind keeps its share."""
    records, seen = [], set()
    for _ in range(n):
        level = rng.randint(1, max_level)
        kind = _kind_of_level(rng, level)
        record = _draw(rng, level, (seen, train, heldout), tries=20, kind=kind)
        if record is None:  # the kind is used up: a train problem of it, never a held-out one
            record = _draw(rng, level, (heldout,), tries=1000, kind=kind)
        if record is None:
            raise ValueError("cannot draw fresh problems outside the held-out set")
        seen.add(record["problem"])
        records.append(record)
    return records


SHORTCUT_MODES = ("replace", "add")


def _shortcut_style(records: list[dict], fraction: float, seed: int,
                    mode: str = "replace") -> list[dict]:
    """About `fraction` of the records in the shortcut style: every multi-digit operation in
    one go ("47 × 6 = 282."), as a strong teacher skips the steps it does not need. "replace":
    the record's solution is rewritten; "add": a shortcut copy of the record follows it (the
    teacher wrote both), so every column solution stays. The answers stay right; one-digit
    problems have nothing to skip. Its own random stream, so the problems drawn do not depend
    on the fraction."""
    if mode not in SHORTCUT_MODES:
        raise ValueError(f"shortcut mode must be one of {SHORTCUT_MODES}, got {mode!r}")
    rng = random.Random(seed * 7919 + 17)
    out = []
    for record in records:
        out.append(record)
        if rng.random() >= fraction:
            continue
        kind, params = _find_kind(record["problem"])
        short = render(kind, record["problem"], params, Calc(shortcut=True))
        if short["solution"] == record["solution"]:
            continue
        if mode == "replace":
            record.update(solution=short["solution"], style="shortcut")
        else:
            out.append({**record, "solution": short["solution"], "style": "shortcut"})
    return out


def generate(out_dir: str, *, n_train: int, n_heldout: int, n_fresh: int = 0,
             seed: int = 0, shortcut_fraction: float = 0.0,
             shortcut_mode: str = "replace", max_level: int = 5,
             train_level_weights: tuple = ()) -> dict[str, str]:
    """Write out_dir/train.jsonl, heldout.jsonl and fresh.jsonl (`n_fresh` problems outside
    both where the kind allows: the demo's RL prompts); returns {"train": path, ...}. The
    held-out problems are drawn first, then train, then fresh, so train and held-out do not
    depend on n_fresh. `shortcut_fraction` of the training problems get a shortcut-style
    solution instead of (`shortcut_mode` "replace") or besides ("add") their column one
    (`_shortcut_style`; held-out and fresh records keep the column style).

    `max_level` 6 adds the hard tail (level 6); held-out and fresh problems draw levels
    1..max_level uniformly, the training problems by `train_level_weights` (() = uniformly):
    a level with a small weight is one the teacher's verified solutions rarely cover, while
    RL's prompts (which need only an answer) and the held-out set have their full share."""
    if not 1 <= max_level <= max(k.difficulty for k in KINDS):
        raise ValueError(f"max_level must be 1..{max(k.difficulty for k in KINDS)}")
    if train_level_weights and len(train_level_weights) != max_level:
        raise ValueError(f"train_level_weights needs {max_level} weights (levels 1..max_level), "
                         f"got {train_level_weights!r}")
    rng = random.Random(seed)
    heldout = _heldout(rng, n_heldout, max_level)
    held = {r["problem"] for r in heldout}
    train = _train(rng, n_train, held, max_level, tuple(train_level_weights))
    fresh = _fresh(rng, n_fresh, {r["problem"] for r in train}, held, max_level)
    if shortcut_fraction > 0:
        train = _shortcut_style(train, shortcut_fraction, seed, shortcut_mode)
    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.jsonl")
             for split in ("train", "heldout", "fresh")}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["heldout"], heldout)
    _write_jsonl(paths["fresh"], fresh)
    return paths


def _find_kind(problem: str) -> tuple[Kind, dict]:
    for kind in KINDS:
        params = kind.parse(problem)
        if params is not None:
            return kind, params
    raise ValueError(f"not a demo-corpus problem: {problem!r}")


def _randint(rng, lo: int, hi: int) -> int:
    """Inclusive randint from a random.Random or a numpy Generator."""
    if hasattr(rng, "integers"):
        return int(rng.integers(lo, hi + 1))
    return rng.randint(lo, hi)


def wrong_solution(record: dict, rng) -> dict:
    """The record's problem solved with one arithmetic slip, carried through to the end.

    Returns a copy of `record` whose "solution" is the flawed rollout and whose
    "rollout_answer" is its (wrong) boxed answer; "answer" stays the gold answer. `rng` is a
    random.Random or a numpy Generator (it picks the slipping step and the size of the slip).
    """
    kind, params = _find_kind(record["problem"])
    short = record.get("style") == "shortcut"  # slip in the record's own style
    counter = Calc(shortcut=short)
    _, gold = kind.solve(params, counter)
    for _ in range(20):
        calc = Calc(slip_at=_randint(rng, 0, counter.count - 1),
                    slip=SLIPS[_randint(rng, 0, len(SLIPS) - 1)], shortcut=short)
        wrong = render(kind, record["problem"], params, calc)
        if wrong["answer"] != str(gold):
            break
    else:  # e.g. a slip swallowed by a floor division: slip the last step instead
        wrong = render(kind, record["problem"], params, Calc(counter.count - 1, 1, short))
    return {**record, "solution": wrong["solution"], "rollout_answer": wrong["answer"]}


def first_slip(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prefix, chosen step, rejected step) of a correct solution and its slipped copy: the
    shared text up to the number where they first differ (cut before that number's space, where
    a tokeniser starts a new token), then that number on each side ("… 6 × 8 =", " 48", " 49").
    A step pair for DPO (`data/pairs.py`): it scores the slip and not the later steps that
    consistently carry it on."""
    i = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
             min(len(chosen), len(rejected)))
    if i == len(chosen) == len(rejected):
        raise ValueError("the two solutions are the same")
    number = "0123456789-"
    while i and chosen[i - 1] in number:
        i -= 1
    if i and chosen[i - 1] == " ":
        i -= 1

    def step(text):
        end = i + 1 if text[i:i + 1] == " " else i
        while end < len(text) and text[end] in number:
            end += 1
        return text[i:end]

    return chosen[:i], step(chosen), step(rejected)


_STEP = re.compile(r"(-?\d+) ([-+×÷]) (-?\d+) = (-?\d+)")


def wrong_steps(solution: str) -> int:
    """How many written steps "a op b = c" of a demo-style solution are false (÷ must be exact).

    A sampled answer can match the gold answer through a false step ("44 ÷ 6 = 6" where the
    sum was 36): Math-Verify's reward, which reads only the boxed answer, counts it correct.
    The README's stage-4 section counts such answers per level with this."""
    bad = 0
    for a, op, b, c in _STEP.findall(solution):
        a, b, c = int(a), int(b), int(c)
        if op == "÷":
            bad += b == 0 or a != b * c
        else:
            bad += Calc.OPS[op](a, b) != c
    return bad


def corpus_texts(paths: str | Iterable[str]) -> Iterator[str]:
    """Texts to train a tokenizer on: the Phi system text once, then every problem and
    solution of the given JSONL files (read line by line)."""
    yield DEFAULT_SYSTEM
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    yield record["problem"]
                    yield record["solution"]
