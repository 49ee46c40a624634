"""A synthetic grade-school math corpus, so the demos train without downloading anything.

`generate(out_dir, n_train=..., n_heldout=...)` writes `train.jsonl` and `heldout.jsonl` with
records {"problem", "solution", "answer", "difficulty", "domain"}:

  difficulty 1  one-digit addition / subtraction                          (arithmetic)
  difficulty 2  two-digit addition with a carry, subtraction with a borrow (arithmetic)
  difficulty 3  two-digit x one-digit multiplication; a + b - c            (arithmetic)
  difficulty 4  word problems with two operations (x then -, + then ÷)     (word_problem)
  difficulty 5  (a + b) x c - d; a three-step shopping problem             (expression,
                                                                            word_problem)

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


# --- difficulty 3 ---------------------------------------------------------------------------
def _sample_mul(rng):
    a = rng.choice([x for x in range(12, 100) if x % 10])
    return {"a": a, "b": rng.randint(2, 9)}


def _mul(p, c):
    a, b = p["a"], p["b"]
    t, o = a // 10 * 10, a % 10
    p1, p2 = c(t, "×", b), c(o, "×", b)
    r = c(p1, "+", p2)
    return (f"Split {a} into {t} + {o}. {t} × {b} = {p1}. {o} × {b} = {p2}. "
            f"Add the parts: {p1} + {p2} = {r}."), r


def _sample_two_step(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": a, "b": b, "c": rng.randint(2, min(99, a + b))}


def _two_step(p, c):
    s = c(p["a"], "+", p["b"])
    r = c(s, "-", p["c"])
    return f"First, {p['a']} + {p['b']} = {s}. Then {s} - {p['c']} = {r}.", r


# --- difficulty 4 ---------------------------------------------------------------------------
def _sample_bags(rng):
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "a": a, "b": b,
            "c": rng.randint(1, a * b - 1)}


def _bags(p, c):
    total = c(p["a"], "×", p["b"])
    r = c(total, "-", p["c"])
    return (f"{p['name']} buys {p['a']} × {p['b']} = {total} {p['item']}. After giving away "
            f"{p['c']}: {total} - {p['c']} = {r}."), r


def _sample_share(rng):
    a, k = rng.randint(5, 60), rng.randint(2, 9)
    b = rng.choice([x for x in range(1, 41) if (a + x) % k == 0])
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "a": a, "b": b, "c": k}


def _share(p, c):
    s = c(p["a"], "+", p["b"])
    r = c(s, "÷", p["c"])
    return (f"In total {p['name']} has {p['a']} + {p['b']} = {s} {p['item']}. "
            f"Each friend gets {s} ÷ {p['c']} = {r}."), r


# --- difficulty 5 ---------------------------------------------------------------------------
def _sample_paren(rng):
    a, b, k = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    return {"a": a, "b": b, "c": k, "d": rng.randint(1, (a + b) * k)}


def _paren(p, c):
    s = c(p["a"], "+", p["b"])
    m = c(s, "×", p["c"])
    r = c(m, "-", p["d"])
    return (f"Parentheses first: {p['a']} + {p['b']} = {s}. Then multiply: {s} × {p['c']} = "
            f"{m}. Finally subtract: {m} - {p['d']} = {r}."), r


def _sample_shop(rng):
    a, b, k, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
    total = a * b + k * d
    return {"name": rng.choice(NAMES), "a": a, "b": b, "c": k, "d": d,
            "e": (total // 10 + rng.randint(1, 3)) * 10}


def _shop(p, c):
    pens = c(p["a"], "×", p["b"])
    books = c(p["c"], "×", p["d"])
    total = c(pens, "+", books)
    r = c(p["e"], "-", total)
    return (f"Pens cost {p['a']} × {p['b']} = {pens} dollars. Notebooks cost {p['c']} × "
            f"{p['d']} = {books} dollars. Total: {pens} + {books} = {total} dollars. "
            f"Change: {p['e']} - {total} = {r} dollars."), r


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
    _Kind("two_step", 3, "arithmetic", ("Compute {a} + {b} - {c}.", "What is {a} + {b} - {c}?"),
          _sample_two_step, _two_step),
    _Kind("bags", 4, "word_problem",
          ("{name} buys {a} bags of {item} with {b} {item} in each bag and gives away {c} "
           "{item}. How many {item} does {name} have left?",), _sample_bags, _bags),
    _Kind("share", 4, "word_problem",
          ("{name} has {a} {item} and gets {b} more. {name} shares them equally among {c} "
           "friends. How many {item} does each friend get?",), _sample_share, _share),
    _Kind("paren", 5, "expression", ("Compute ({a} + {b}) × {c} - {d}.",
                                     "Evaluate ({a} + {b}) × {c} - {d}."), _sample_paren, _paren),
    _Kind("shop", 5, "word_problem",
          ("{name} buys {a} pens at {b} dollars each and {c} notebooks at {d} dollars each, "
           "and pays with {e} dollars. How much change does {name} get?",), _sample_shop, _shop),
)


def _render(kind: _Kind, problem: str, params: dict, calc: _Calc) -> dict:
    steps, answer = kind.solve(params, calc)
    return {"problem": problem, "solution": f"{steps} {ANSWER_SUFFIX.format(answer)}",
            "answer": str(answer), "difficulty": kind.difficulty, "domain": kind.domain}


def sample_record(rng: random.Random, level: Optional[int] = None) -> dict:
    """One random record: a uniform difficulty (unless given), then a uniform kind and
    template within it."""
    level = rng.randint(1, 5) if level is None else level
    kind = rng.choice([k for k in KINDS if k.difficulty == level])
    params = kind.sample(rng)
    problem = rng.choice(kind.templates).format(**params)
    return _render(kind, problem, params, _Calc())


def _draw(rng: random.Random, level: int, avoid: tuple[set[str], ...],
          tries: int) -> Optional[dict]:
    """A record of `level` whose problem is in none of `avoid` (retries keep the level, so
    rejecting repeats does not skew the difficulty spread)."""
    for _ in range(tries):
        record = sample_record(rng, level)
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


def generate(out_dir: str, *, n_train: int, n_heldout: int, seed: int = 0) -> dict[str, str]:
    """Write out_dir/train.jsonl and out_dir/heldout.jsonl; returns {"train": path, ...}."""
    rng = random.Random(seed)
    heldout = _heldout(rng, n_heldout)
    train = _train(rng, n_train, {r["problem"] for r in heldout})
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"),
             "heldout": os.path.join(out_dir, "heldout.jsonl")}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["heldout"], heldout)
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
