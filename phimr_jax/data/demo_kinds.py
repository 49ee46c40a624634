"""The demo corpus' problem families (`KINDS`): for each, its problem templates (which double
as parsers, so a record read back from disk can be solved again), a parameter sampler and a
solver that writes the step-by-step solution through a `Calc`, which counts operations and can
slip on one of them (`demo_corpus.wrong_solution`). `demo_corpus` draws the splits from these;
its docstring describes the levels."""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Optional

ANSWER_SUFFIX = "The answer is \\boxed{{{}}}."
NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas",
         "Kemi", "Liam", "Maya", "Noah", "Omar", "Priya", "Rosa", "Sam", "Tara", "Yuki")
ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "cards", "shells", "stamps")
_FIELD_PATTERNS = {"name": r"[A-Z][a-z]+", "item": r"[a-z]+"}  # other fields are integers


class Calc:
    """Does a solution's arithmetic, counting operations; may slip on operation `slip_at`.
    `shortcut`: the solvers write each multi-digit sum, difference or product in one go
    ("47 × 6 = 282.") instead of column by column (`demo_corpus.generate`'s shortcut style)."""

    OPS: dict[str, Callable[[int, int], int]] = {
        "+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
        "÷": lambda a, b: a // b}  # exact on correct paths; a slipped path may floor

    def __init__(self, slip_at: Optional[int] = None, slip: int = 0, shortcut: bool = False):
        self.slip_at, self.slip, self.count, self.shortcut = slip_at, slip, 0, shortcut

    def __call__(self, a: int, op: str, b: int) -> int:
        result = self.OPS[op](a, b) + (self.slip if self.count == self.slip_at else 0)
        self.count += 1
        return result


@dataclasses.dataclass(frozen=True)
class Kind:
    """One family of problems: templates (also parsers), a sampler and a solver."""

    name: str
    difficulty: int
    domain: str
    templates: tuple[str, ...]
    sample: Callable[[random.Random], dict]
    solve: Callable[[dict, Calc], tuple[str, int]]  # -> (steps text, answer)
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


def _column_add(a, b, c, tens_of_b: bool):
    """(steps, sum) of a + b column by column: the ones digits, then the rest of a plus the
    carry (and first b's tens digit when `tens_of_b`: b is a two-digit number). Every step is a
    one-digit fact or a carry added to a number, the steps levels 1-2 and the column products
    teach. `tens_of_b` comes from the problem, not from b's value, so a solution whose earlier
    step slipped has the same shape as the correct one."""
    if c.shortcut:
        r = c(a, "+", b)
        return f"{a} + {b} = {r}.", r
    ones = c(a % 10, "+", b % 10)
    head = f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10} and carry {ones // 10}. "
    if tens_of_b:
        tens = c(a // 10, "+", b // 10)
        total_tens = c(tens, "+", ones // 10)
        head += (f"Tens: {a // 10} + {b // 10} = {tens}, plus the carry: {tens} + {ones // 10} "
                 f"= {total_tens}. ")
    else:
        total_tens = c(a // 10, "+", ones // 10)
        head += f"Tens: {a // 10} + {ones // 10} = {total_tens}. "
    r = total_tens * 10 + ones % 10
    return f"{head}So {a} + {b} = {r}.", r


def _add2(p, c):
    return _column_add(p["a"], p["b"], c, tens_of_b=True)


def _sample_sub2(rng):
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a > b and a % 10 < b % 10:
            return {"a": a, "b": b}


def _sub2(p, c):
    a, b = p["a"], p["b"]
    if c.shortcut:
        r = c(a, "-", b)
        return f"{a} - {b} = {r}.", r
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
    if c.shortcut:
        r = c(a, "×", b)
        return f"{a} × {b} = {r}.", r
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
    added, r = _column_add(total, p["c"], c, tens_of_b=False)
    return f"{steps} With {p['c']} more: {added}", r


def _sample_shop(rng):
    return {"name": rng.choice(NAMES), "a": rng.randint(2, 9), "b": rng.randint(2, 9),
            "c": rng.randint(2, 9), "d": rng.randint(2, 9)}


def _shop(p, c):
    pens = c(p["a"], "×", p["b"])
    books = c(p["c"], "×", p["d"])
    added, r = _column_add(pens, books, c, tens_of_b=True)  # books: up to 81
    return (f"Pens cost {p['a']} × {p['b']} = {pens} dollars. Notebooks cost {p['c']} × "
            f"{p['d']} = {books} dollars. Total: {added}"), r


def _sample_paren(rng):
    while True:
        a, b = rng.randint(10, 89), rng.randint(1, 9)
        if (a + b) % 10:
            return {"a": a, "b": b, "c": rng.randint(2, 9)}


def _sum_times(p, c):
    """(steps, (a + b) × c): the column sum, then the column product (levels 5 and 6)."""
    added, s = _column_add(p["a"], p["b"], c, tens_of_b=False)
    steps, r = _column_mul(s, p["c"], c)
    return f"{added} {steps}", r


def _paren(p, c):
    steps, r = _sum_times(p, c)
    return f"Parentheses first: {steps}", r


def _sample_friends(rng):
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), **_sample_paren(rng)}


def _friends(p, c):
    steps, r = _sum_times(p, c)
    return f"Each friend has {steps}", r


# --- difficulty 6: a level-5 chain, then a one-digit number more (the bags problems' last step)
def _sample_paren_more(rng):
    return {**_sample_paren(rng), "d": rng.randint(1, 9)}


def _sum_times_plus(p, c):
    """(steps of (a + b) × c, steps of adding d, the answer)."""
    steps, product = _sum_times(p, c)
    more, r = _column_add(product, p["d"], c, tens_of_b=False)
    return steps, more, r


def _paren_more(p, c):
    steps, more, r = _sum_times_plus(p, c)
    return f"Parentheses first: {steps} Then add {p['d']}: {more}", r


def _sample_friends_more(rng):
    return {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), **_sample_paren_more(rng)}


def _friends_more(p, c):
    steps, more, r = _sum_times_plus(p, c)
    return f"Each friend has {steps} With {p['d']} more: {more}", r


def _pair(rng, lo, hi):
    return {"a": rng.randint(lo, hi), "b": rng.randint(lo, hi)}


KINDS = (
    Kind("add1", 1, "arithmetic", ("What is {a} + {b}?", "Compute {a} + {b}.",
                                    "Find the sum of {a} and {b}.", "Add {a} and {b}."),
          lambda rng: _pair(rng, 0, 9), _add1, lambda p: p["a"] < 10 and p["b"] < 10),
    Kind("sub1", 1, "arithmetic", ("What is {a} - {b}?", "Compute {a} - {b}.",
                                    "Subtract {b} from {a}.", "Find the difference {a} - {b}."),
          _sample_sub1, _sub1, lambda p: p["b"] <= p["a"] < 10),
    Kind("add2", 2, "arithmetic", ("What is {a} + {b}?", "Compute {a} + {b}."),
          _sample_add2, _add2, lambda p: min(p["a"], p["b"]) >= 10),
    Kind("sub2", 2, "arithmetic", ("What is {a} - {b}?", "Compute {a} - {b}."),
          _sample_sub2, _sub2, lambda p: p["a"] >= 10 and p["b"] >= 10),
    Kind("mul", 3, "arithmetic", ("What is {a} × {b}?", "Compute {a} × {b}.",
                                   "Multiply {a} by {b}."), _sample_mul, _mul),
    Kind("bags", 4, "word_problem",
          ("{name} buys {a} bags of {item} with {b} {item} in each bag and finds {c} more "
           "{item}. How many {item} does {name} have?",), _sample_bags, _bags),
    Kind("shop", 4, "word_problem",
          ("{name} buys {a} pens at {b} dollars each and {c} notebooks at {d} dollars each. "
           "How much does {name} pay?",), _sample_shop, _shop),
    Kind("paren", 5, "expression", ("Compute ({a} + {b}) × {c}.", "Evaluate ({a} + {b}) × {c}."),
          _sample_paren, _paren),
    Kind("friends", 5, "word_problem",
          ("Each of {c} friends has {a} {item} and gets {b} more. How many {item} do the "
           "friends have in all?",), _sample_friends, _friends),
    # Level 6, the hard tail: only with `demo_corpus.generate(max_level=6)` (its default is 5;
    # the demo presets' data.demo_max_level is 6).
    Kind("paren_more", 6, "expression", ("Compute ({a} + {b}) × {c} + {d}.",
                                         "Evaluate ({a} + {b}) × {c} + {d}."),
         _sample_paren_more, _paren_more),
    Kind("friends_more", 6, "word_problem",
         ("Each of {c} friends has {a} {item} and gets {b} more, and then they find {d} more "
          "{item}. How many {item} do the friends have in all?",),
         _sample_friends_more, _friends_more),
)


def render(kind: Kind, problem: str, params: dict, calc: Calc) -> dict:
    steps, answer = kind.solve(params, calc)
    return {"problem": problem, "solution": f"{steps} {ANSWER_SUFFIX.format(answer)}",
            "answer": str(answer), "difficulty": kind.difficulty, "domain": kind.domain,
            "style": "column"}
