"""A synthetic grade-school math corpus, so the demos train without downloading anything.

`generate(out_dir, n_train=..., n_heldout=..., n_fresh=...)` writes `train.jsonl`,
`heldout.jsonl` and `fresh.jsonl` (problems in neither, for RL prompts) with records
{"problem", "solution", "answer", "difficulty", "domain"}:

  difficulty 1  one-digit addition / subtraction                          (arithmetic)
  difficulty 2  two-digit addition with a carry, subtraction with a borrow (arithmetic)
  difficulty 3  two-digit x one-digit multiplication, column by column     (arithmetic)
  difficulty 4  word problems: bags (a product, then + a few more); a      (word_problem)
                shopping bill (two times-table facts, then their sum)
  difficulty 5  (a + b) x c: a sum, then a column product; the same as a   (expression,
                word problem about friends                                  word_problem)

Levels 3-5 are chains of the steps levels 1-2 teach plus times-table facts, each written out
(no multi-digit step done in one go except adding a one-digit number), so a harder level is a
longer chain of steps the model can learn rather than a step it cannot, and the answers are
two- or three-digit numbers that a chain with a false step rarely hits by luck (the reward
only reads the boxed answer; README, "demo recipe").

Each solution is a short chain of thought (under 60 words) whose every step is an exact integer
operation, ending with "The answer is \\boxed{N}."; answers are non-negative integers written as
strings. Difficulty levels are drawn uniformly. Held-out problems are distinct from each other
and never appear in train; train problems are distinct too while the level has unused
problems, but level 1 has only ~600 distinct problems, so large train sets repeat some easy
ones (documented simplification: repetition of one-digit sums is harmless for the demo).

`wrong_solution(record, rng)` gives the same problem solved with one deliberate slip (one
operation off by 1, 2 or 10) carried through the later steps, so the rollout looks plausible and
ends in a wrong boxed answer: rejected samples for DPO. It works from the problem text alone
(each problem template doubles as a parser), so it also works on records read back from disk.

Everything is deterministic given the seed (Python's `random.Random`, whose integer streams are
stable across Python versions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Callable, Iterable, Iterator, Optional

from phimr_jax.data.tokenizers import DEFAULT_SYSTEM

ANSWER_SUFFIX = "The answer is \\boxed{{{}}}."
NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas",
         "Kemi", "Liam", "Maya", "Noah", "Omar", "Priya", "Rosa", "Sam", "Tara", "Yuki")
ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "cards", "shells", "stamps")
SLIPS = (-10, -2, -1, 1, 2, 10)
_FIELD_PATTERNS = {"name": r"[A-Z][a-z]+", "item": r"[a-z]+"}  # other fields are integers


class _Calc:
    """Does a solution's arithmetic, counting operations; may slip on operation `slip_at`."""

    OPS: dict[str, Callable[[int, int], int]] = {
        "+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
        "÷": lambda a, b: a // b}  # exact on correct paths; a slipped path may floor

    def __init__(self, slip_at: Optional[int] = None, slip: int = 0):
        self.slip_at, self.slip, self.count = slip_at, slip, 0

    def __call__(self, a: int, op: str, b: int) -> int:
        result = self.OPS[op](a, b) + (self.slip if self.count == self.slip_at else 0)
        self.count += 1
        return result


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One family of problems: templates (also parsers), a sampler and a solver."""

    name: str
    difficulty: int
    domain: str
    templates: tuple[str, ...]
    sample: Callable[[random.Random], dict]
    solve: Callable[[dict, _Calc], tuple[str, int]]  # -> (steps text, answer)
    valid: Callable[[dict], bool] = lambda p: True  # tells kinds with the same template apart

    def parse(self, problem: str) -> Optional[dict]:
        for template in self.templates:
            m = _template_regex(template).fullmatch(problem)
            if m:
                params = {k: int(v) if v.isdigit() else v for k, v in m.groupdict().items()}
                return params if self.valid(params) else None
        return None


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out, seen = [], set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part in seen:
            out.append(f"(?P={part})")
        else:
            seen.add(part)
            out.append(f"(?P<{part}>{_FIELD_PATTERNS.get(part, r'[0-9]+')})")
    return re.compile("".join(out))


# --- difficulty 1 ---------------------------------------------------------------------------
def _add1(p, c):
    r = c(p["a"], "+", p["b"])
    return f"We add: {p['a']} + {p['b']} = {r}.", r


def _sub1(p, c):
    r = c(p["a"], "-", p["b"])
    return f"We subtract: {p['a']} - {p['b']} = {r}.", r


def _sample_sub1(rng):
    a = rng.randint(1, 9)
    return {"a": a, "b": rng.randint(0, a)}


# --- difficulty 2 ---------------------------------------------------------------------------
def _sample_add2(rng):
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a % 10 + b % 10 >= 10:
            return {"a": a, "b": b}


def _add2(p, c):
    a, b = p["a"], p["b"]
    ones = c(a % 10, "+", b % 10)
    tens = c(a // 10, "+", b // 10)
    total_tens = c(tens, "+", ones // 10)
    r = total_tens * 10 + ones % 10
    return (f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10} and carry {ones // 10}. "
            f"Tens: {a // 10} + {b // 10} = {tens}, plus the carry: {tens} + {ones // 10} = "
            f"{total_tens}. So {a} + {b} = {r}."), r


def _sample_sub2(rng):
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a > b and a % 10 < b % 10:
            return {"a": a, "b": b}


def _sub2(p, c):
    a, b = p["a"], p["b"]
    borrowed = c(a % 10, "+", 10)
    ones = c(borrowed, "-", b % 10)
    tens = c(a // 10, "-", 1)
    rest = c(tens, "-", b // 10)
    r = rest * 10 + ones
    return (f"Ones: {a % 10} is less than {b % 10}, so borrow ten: {a % 10} + 10 = {borrowed} "
            f"and {borrowed} - {b % 10} = {ones}. Tens: {a // 10} - 1 = {tens} after the "
            f"borrow, and {tens} - {b // 10} = {rest}. So {a} - {b} = {r}."), r


# --- difficulties 3-5: column multiplication, then chains built on it --------------------
# Every step of levels 3-5 is one the model also meets at levels 1-2 (a one-digit fact, a carry
# added to a small number) or a times-table fact, written column by column like the level-2
# sums, so a level-k problem is a longer chain of steps the model can learn; its answer is a
# two- or three-digit number that a wrong step rarely hits by luck.
def _sample_mul(rng):
    return {"a": rng.choice([x for x in range(12, 100) if x % 10]), "b": rng.randint(2, 9)}


def _column_mul(a, b, c):
    """(steps, product) of a two-digit a times a one-digit b, column by column."""
    ones = c(a % 10, "×", b)
    tens = c(a // 10, "×", b)
    total_tens = c(tens, "+", ones // 10)
    r = total_tens * 10 + ones % 10
    return (f"Ones: {a % 10} × {b} = {ones}, write {ones % 10} and carry {ones // 10}. "
            f"Tens: {a // 10} × {b} = {tens}, plus the carry: {tens} + {ones // 10} = "
            f"{total_tens}. So {a} × {b} = {r}."), r


def _mul(p, c):
    return _column_mul(p["a"], p["b"], c)


def _sample_bags(rng):
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "a": rng.randint(2, 9),
            "b": rng.choice([x for x in range(12, 100) if x % 10]), "c": rng.randint(1, 9)}


def _bags(p, c):
    steps, total = _column_mul(p["b"], p["a"], c)
    r = c(total, "+", p["c"])
    return f"{steps} With {p['c']} more: {total} + {p['c']} = {r}.", r


def _sample_shop(rng):
    return {"name": rng.choice(NAMES), "a": rng.randint(2, 9), "b": rng.randint(2, 9),
            "c": rng.randint(2, 9), "d": rng.randint(2, 9)}


def _shop(p, c):
    pens = c(p["a"], "×", p["b"])
    books = c(p["c"], "×", p["d"])
    r = c(pens, "+", books)
    return (f"Pens cost {p['a']} × {p['b']} = {pens} dollars. Notebooks cost {p['c']} × "
            f"{p['d']} = {books} dollars. Total: {pens} + {books} = {r} dollars."), r


def _sample_paren(rng):
    while True:
        a, b = rng.randint(10, 89), rng.randint(1, 9)
        if (a + b) % 10:
            return {"a": a, "b": b, "c": rng.randint(2, 9)}


def _paren(p, c):
    s = c(p["a"], "+", p["b"])
    steps, r = _column_mul(s, p["c"], c)
    return f"Parentheses first: {p['a']} + {p['b']} = {s}. {steps}", r


def _sample_friends(rng):
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), **_sample_paren(rng)}


def _friends(p, c):
    s = c(p["a"], "+", p["b"])
    steps, r = _column_mul(s, p["c"], c)
    return f"Each friend has {p['a']} + {p['b']} = {s} {p['item']}. {steps}", r


def _pair(rng, lo, hi):
    return {"a": rng.randint(lo, hi), "b": rng.randint(lo, hi)}


KINDS = (
    _Kind("add1", 1, "arithmetic", ("What is {a} + {b}?", "Compute {a} + {b}.",
                                    "Find the sum of {a} and {b}.", "Add {a} and {b}."),
          lambda rng: _pair(rng, 0, 9), _add1, lambda p: p["a"] < 10 and p["b"] < 10),
    _Kind("sub1", 1, "arithmetic", ("What is {a} - {b}?", "Compute {a} - {b}.",
                                    "Subtract {b} from {a}.", "Find the difference {a} - {b}."),
          _sample_sub1, _sub1, lambda p: p["b"] <= p["a"] < 10),
    _Kind("add2", 2, "arithmetic", ("What is {a} + {b}?", "Compute {a} + {b}."),
          _sample_add2, _add2, lambda p: min(p["a"], p["b"]) >= 10),
    _Kind("sub2", 2, "arithmetic", ("What is {a} - {b}?", "Compute {a} - {b}."),
          _sample_sub2, _sub2, lambda p: p["a"] >= 10 and p["b"] >= 10),
    _Kind("mul", 3, "arithmetic", ("What is {a} × {b}?", "Compute {a} × {b}.",
                                   "Multiply {a} by {b}."), _sample_mul, _mul),
    _Kind("bags", 4, "word_problem",
          ("{name} buys {a} bags of {item} with {b} {item} in each bag and finds {c} more "
           "{item}. How many {item} does {name} have?",), _sample_bags, _bags),
    _Kind("shop", 4, "word_problem",
          ("{name} buys {a} pens at {b} dollars each and {c} notebooks at {d} dollars each. "
           "How much does {name} pay?",), _sample_shop, _shop),
    _Kind("paren", 5, "expression", ("Compute ({a} + {b}) × {c}.", "Evaluate ({a} + {b}) × {c}."),
          _sample_paren, _paren),
    _Kind("friends", 5, "word_problem",
          ("Each of {c} friends has {a} {item} and gets {b} more. How many {item} do the "
           "friends have in all?",), _sample_friends, _friends),
)


def _render(kind: _Kind, problem: str, params: dict, calc: _Calc) -> dict:
    steps, answer = kind.solve(params, calc)
    return {"problem": problem, "solution": f"{steps} {ANSWER_SUFFIX.format(answer)}",
            "answer": str(answer), "difficulty": kind.difficulty, "domain": kind.domain}


def _kind_of_level(rng: random.Random, level: int) -> _Kind:
    return rng.choice([k for k in KINDS if k.difficulty == level])


def sample_record(rng: random.Random, level: Optional[int] = None,
                  kind: Optional[_Kind] = None) -> dict:
    """One random record: a uniform difficulty (unless given), then a uniform kind (unless
    given) and template within it."""
    level = rng.randint(1, 5) if level is None else level
    kind = kind or _kind_of_level(rng, level)
    params = kind.sample(rng)
    problem = rng.choice(kind.templates).format(**params)
    return _render(kind, problem, params, _Calc())


def _draw(rng: random.Random, level: int, avoid: tuple[set[str], ...],
          tries: int, kind: Optional[_Kind] = None) -> Optional[dict]:
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


def _heldout(rng: random.Random, n: int) -> list[dict]:
    records, seen = [], set()
    for _ in range(n):
        record = _draw(rng, rng.randint(1, 5), (seen,), tries=1000)
        if record is None:
            raise ValueError(f"cannot draw {n} distinct held-out problems")
        seen.add(record["problem"])
        records.append(record)
    return records


def _train(rng: random.Random, n: int, heldout: set[str]) -> list[dict]:
    records, seen = [], set()
    for _ in range(n):
        level = rng.randint(1, 5)
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


def _fresh(rng: random.Random, n: int, train: set[str], heldout: set[str]) -> list[dict]:
    """Problems in neither split (RL prompts the model has not been trained on), as far as the
    kind has any left; a used-up kind (one-digit sums, the 640 products) repeats train
    problems, never held-out ones, so every kind keeps its share."""
    records, seen = [], set()
    for _ in range(n):
        level = rng.randint(1, 5)
        kind = _kind_of_level(rng, level)
        record = _draw(rng, level, (seen, train, heldout), tries=20, kind=kind)
        if record is None:  # the kind is used up: a train problem of it, never a held-out one
            record = _draw(rng, level, (heldout,), tries=1000, kind=kind)
        if record is None:
            raise ValueError("cannot draw fresh problems outside the held-out set")
        seen.add(record["problem"])
        records.append(record)
    return records


def generate(out_dir: str, *, n_train: int, n_heldout: int, n_fresh: int = 0,
             seed: int = 0) -> dict[str, str]:
    """Write out_dir/train.jsonl, heldout.jsonl and fresh.jsonl (`n_fresh` problems outside
    both where the kind allows: the demo's RL prompts); returns {"train": path, ...}. The
    held-out problems are drawn first, then train, then fresh, so train and held-out do not
    depend on n_fresh."""
    rng = random.Random(seed)
    heldout = _heldout(rng, n_heldout)
    held = {r["problem"] for r in heldout}
    train = _train(rng, n_train, held)
    fresh = _fresh(rng, n_fresh, {r["problem"] for r in train}, held)
    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.jsonl")
             for split in ("train", "heldout", "fresh")}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["heldout"], heldout)
    _write_jsonl(paths["fresh"], fresh)
    return paths


def _find_kind(problem: str) -> tuple[_Kind, dict]:
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
    counter = _Calc()
    _, gold = kind.solve(params, counter)
    for _ in range(20):
        calc = _Calc(slip_at=_randint(rng, 0, counter.count - 1),
                     slip=SLIPS[_randint(rng, 0, len(SLIPS) - 1)])
        wrong = _render(kind, record["problem"], params, calc)
        if wrong["answer"] != str(gold):
            break
    else:  # e.g. a slip swallowed by a floor division: slip the last step instead
        wrong = _render(kind, record["problem"], params, _Calc(counter.count - 1, 1))
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
            bad += _Calc.OPS[op](a, b) != c
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
