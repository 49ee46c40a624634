"""Synthetic demo corpus: correct answers (recomputed independently), format, splits, DPO
negatives."""

import collections
import json
import random
import re

import numpy as np
import pytest

from phimr_jax.data import demo_corpus

EQUATION = re.compile(r"(\d+) ([-+×÷]) (\d+) = (-?\d+)")
BOXED = re.compile(r"The answer is \\boxed\{(-?\d+)\}\.$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
       "÷": lambda a, b: a / b}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _independent_answer(problem: str) -> int:
    """Solve a demo problem without the generator's code: arithmetic problems are evaluated
    as expressions; each word-problem family by its own formula."""
    nums = [int(x) for x in re.findall(r"\d+", problem)]
    if m := re.search(r"(?:What is|Compute|Evaluate|Find the difference) ([-+×()\d ]+)[?.]$",
                      problem):
        expr = m.group(1).replace("×", "*")
        assert re.fullmatch(r"[-+*() \d]+", expr)
        return eval(expr)  # noqa: S307 - digits and operators only (checked above)
    if problem.startswith(("Find the sum", "Add ")):
        return nums[0] + nums[1]
    if problem.startswith("Subtract"):
        return nums[1] - nums[0]
    if problem.startswith("Multiply"):
        return nums[0] * nums[1]
    if "bags of" in problem:
        return nums[0] * nums[1] + nums[2]
    if "pens at" in problem:
        return nums[0] * nums[1] + nums[2] * nums[3]
    if "they find" in problem:  # level 6: c friends with a + b each, then d more
        return nums[0] * (nums[1] + nums[2]) + nums[3]
    if "friends has" in problem:
        return nums[0] * (nums[1] + nums[2])
    raise AssertionError(f"unknown problem family: {problem}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = demo_corpus.generate(str(out), n_train=1500, n_heldout=200, seed=3)
    return paths, _read(paths["train"]), _read(paths["heldout"])


def test_records_are_correct_and_well_formed(corpus):
    _, train, heldout = corpus
    for r in train + heldout:
        assert set(r) == {"problem", "solution", "answer", "difficulty", "domain", "style"}
        assert r["style"] == "column"  # the shortcut style only with shortcut_fraction
        gold = _independent_answer(r["problem"])
        assert gold >= 0 and r["answer"] == str(gold), r
        assert BOXED.search(r["solution"]).group(1) == r["answer"]
        steps = EQUATION.findall(r["solution"])
        assert steps, r["solution"]
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c), r["solution"]
        assert len(r["solution"].split()) < 80


def test_every_step_is_one_the_model_meets_at_levels_1_and_2(corpus):
    """No multi-digit operation is done in one go: each written step (other than the "So
    a op b = c" that restates a column's result) has a one-digit right operand (a one-digit
    fact, a times-table fact, a carry added to a number) or is level 2's borrow (+ 10). A
    one-shot "63 + 21 = 84" or "47 + 8 = 55" would be a fact per number pair, which held-out
    problems mostly ask for unseen (README, "demo recipe")."""
    _, train, heldout = corpus
    for r in train + heldout:
        for m in EQUATION.finditer(r["solution"]):
            if r["solution"][:m.start()].endswith("So "):
                continue
            a, op, b, _ = m.groups()
            assert int(b) < 10 or (op == "+" and b == "10"), (m.group(0), r["solution"])


def test_difficulty_spread_and_domains(corpus):
    _, train, heldout = corpus
    levels = collections.Counter(r["difficulty"] for r in train)
    assert sorted(levels) == [1, 2, 3, 4, 5]
    assert min(levels.values()) > 0.15 * len(train)  # uniform: 20% each
    domains = {r["domain"] for r in train}
    assert domains == {"arithmetic", "word_problem", "expression"}
    by_level = collections.defaultdict(set)
    for r in train:
        by_level[r["difficulty"]].add(r["domain"])
    assert by_level[1] == by_level[2] == by_level[3] == {"arithmetic"}
    assert {r["difficulty"] for r in heldout} == {1, 2, 3, 4, 5}


def test_hard_tail_is_rare_in_train_and_has_its_share_of_heldout_and_fresh(tmp_path):
    paths = demo_corpus.generate(str(tmp_path), n_train=3000, n_heldout=300, n_fresh=600,
                                 seed=5, max_level=6, train_level_weights=(1, 1, 1, 1, 1, 0.1))
    train, heldout, fresh = (_read(paths[s]) for s in ("train", "heldout", "fresh"))
    share = {name: collections.Counter(r["difficulty"] for r in records)[6] / len(records)
             for name, records in (("train", train), ("heldout", heldout), ("fresh", fresh))}
    assert 0.01 < share["train"] < 0.035  # 0.1 / 5.1 = 2%
    assert share["heldout"] > 0.11 and share["fresh"] > 0.11  # uniform: 1/6
    tail = [r for r in train + heldout + fresh if r["difficulty"] == 6]
    assert {r["domain"] for r in tail} == {"expression", "word_problem"}
    for r in tail:
        assert r["answer"] == str(_independent_answer(r["problem"])), r
        assert BOXED.search(r["solution"]).group(1) == r["answer"]
        for a, op, b, c in EQUATION.findall(r["solution"]):
            assert OPS[op](int(a), int(b)) == int(c), r["solution"]
        assert len(r["solution"].split()) < 100
        wrong = demo_corpus.wrong_solution(r, random.Random(0))
        assert wrong["rollout_answer"] != r["answer"]
    with pytest.raises(ValueError, match="6 weights"):
        demo_corpus.generate(str(tmp_path / "x"), n_train=10, n_heldout=10, max_level=6,
                             train_level_weights=(1, 1))


def test_splits_disjoint_and_deterministic(corpus, tmp_path):
    paths, train, heldout = corpus
    held = [r["problem"] for r in heldout]
    assert len(set(held)) == len(held)
    assert not set(held) & {r["problem"] for r in train}
    again = demo_corpus.generate(str(tmp_path / "a"), n_train=1500, n_heldout=200, seed=3)
    for split in ("train", "heldout"):
        with open(paths[split], "rb") as f1, open(again[split], "rb") as f2:
            assert f1.read() == f2.read()
    other = demo_corpus.generate(str(tmp_path / "b"), n_train=50, n_heldout=10, seed=4)
    assert _read(other["train"])[:10] != train[:10]


def test_fresh_problems_are_new_where_the_kind_has_room_and_never_held_out(tmp_path):
    paths = demo_corpus.generate(str(tmp_path), n_train=3000, n_heldout=200, n_fresh=600,
                                 seed=1)
    train, heldout, fresh = (_read(paths[s]) for s in ("train", "heldout", "fresh"))
    assert len(fresh) == 600
    assert not {r["problem"] for r in fresh} & {r["problem"] for r in heldout}
    seen = {r["problem"] for r in train}
    kinds = collections.Counter(demo_corpus._find_kind(r["problem"])[0].name for r in fresh)
    assert set(kinds) == {k.name for k in demo_corpus.KINDS if k.difficulty <= 5}
    assert min(kinds.values()) > 0.4 * 600 / 10  # uniform levels, then kinds within a level
    # The word problems and expressions have room: all new. One-digit sums are used up by
    # train (~600 distinct problems): repeats.
    assert all(r["problem"] not in seen for r in fresh if r["difficulty"] >= 4)
    assert any(r["problem"] in seen for r in fresh if r["difficulty"] == 1)
    # Adding fresh problems leaves train and held-out as they were.
    plain = demo_corpus.generate(str(tmp_path / "plain"), n_train=3000, n_heldout=200, seed=1)
    assert _read(plain["train"]) == train and _read(plain["heldout"]) == heldout


def test_large_train_repeats_only_easy_problems(tmp_path):
    paths = demo_corpus.generate(str(tmp_path), n_train=6000, n_heldout=300, seed=0)
    train, heldout = _read(paths["train"]), _read(paths["heldout"])
    counts = collections.Counter(r["problem"] for r in train)
    repeated = {p for p, c in counts.items() if c > 1}
    assert repeated  # level 1 has ~600 problems; 1200 were asked for
    assert all(r["difficulty"] == 1 for r in train if r["problem"] in repeated)
    assert not counts.keys() & {r["problem"] for r in heldout}


@pytest.mark.parametrize("rng_kind", ["random", "numpy"])
def test_wrong_solution_is_plausible_and_wrong(corpus, rng_kind):
    _, train, _ = corpus
    rng = random.Random(0) if rng_kind == "random" else np.random.default_rng(0)
    for r in train[:300]:
        w = demo_corpus.wrong_solution(r, rng)
        assert w["problem"] == r["problem"] and w["answer"] == r["answer"]
        boxed = BOXED.search(w["solution"]).group(1)
        assert boxed == w["rollout_answer"] != r["answer"]
        steps = EQUATION.findall(w["solution"])
        wrong = [s for s in steps if OPS[s[1]](int(s[0]), int(s[2])) != int(s[3])]
        assert len(wrong) >= 1, w["solution"]
        # Same wording as the correct rollout: only numbers differ.
        assert re.sub(r"-?\d+", "N", w["solution"]) == re.sub(r"-?\d+", "N", r["solution"])
    with pytest.raises(ValueError, match="not a demo-corpus problem"):
        demo_corpus.wrong_solution({"problem": "What is the capital of France?"}, rng)


def test_wrong_solution_tells_same_template_kinds_apart():
    rng = random.Random(1)
    two_digit = {"problem": "What is 47 + 38?", "answer": "85"}
    w = demo_corpus.wrong_solution(two_digit, rng)
    assert "carry" in w["solution"] and w["rollout_answer"] != "85"


def test_corpus_texts(corpus):
    paths, train, heldout = corpus
    texts = list(demo_corpus.corpus_texts([paths["heldout"]]))
    assert texts[0] == demo_corpus.DEFAULT_SYSTEM
    assert texts[1:] == [t for r in heldout for t in (r["problem"], r["solution"])]
    assert len(list(demo_corpus.corpus_texts(paths["train"]))) == 1 + 2 * len(train)


def test_wrong_steps_counts_false_steps_of_gold_and_slipped_solutions(corpus):
    _, train, _ = corpus
    assert all(demo_corpus.wrong_steps(r["solution"]) == 0 for r in train[:500])
    rng = random.Random(3)
    slipped = [demo_corpus.wrong_solution(r, rng)["solution"] for r in train[:200]]
    assert all(demo_corpus.wrong_steps(s) >= 1 for s in slipped)
    # A "correct" answer reached through a false step (a sampled rollout seen in the demo).
    lucky = ("In total Priya has 7 + 29 = 44 shells. Each friend gets 44 ÷ 6 = 6. "
             "The answer is \\boxed{6}.")
    assert demo_corpus.wrong_steps(lucky) == 2  # 7 + 29 is 36, and 44 ÷ 6 is not exact
    assert demo_corpus.wrong_steps("So 37 + 45 = 82. The answer is \\boxed{82}.") == 0


def test_first_slip_cuts_both_solutions_at_the_slipped_number(corpus):
    _, train, _ = corpus
    rng = random.Random(5)
    for r in train[:300]:
        w = demo_corpus.wrong_solution(r, rng)
        prefix, chosen, rejected = demo_corpus.first_slip(r["solution"], w["solution"])
        assert r["solution"].startswith(prefix + chosen)
        assert w["solution"].startswith(prefix + rejected)
        assert chosen != rejected and re.fullmatch(r" -?\d+", chosen) and re.fullmatch(
            r" -?\d+", rejected)
        # Every written step before the slip is right; the slipped one is the first false one.
        assert demo_corpus.wrong_steps(prefix + chosen) == 0
        assert demo_corpus.wrong_steps(prefix + rejected) == 1
    assert demo_corpus.first_slip("9 × 6 = 54.", "9 × 6 = 64.") == ("9 × 6 =", " 54", " 64")
    assert demo_corpus.first_slip("So 5 - 3 = 2.", "So 5 - 3 = -8.") == ("So 5 - 3 =", " 2", " -8")


def test_shortcut_style_rewrites_a_fraction_of_train_and_keeps_problems(tmp_path):
    """shortcut_fraction: about that share of the multi-digit training solutions is written in
    one go ("47 × 6 = 282."), with the same right answer; the problems of every split, the
    held-out and fresh solutions are those of the column corpus; slipped copies keep the style."""
    base = demo_corpus.generate(str(tmp_path / "a"), n_train=2000, n_heldout=100, n_fresh=100,
                                seed=5)
    mixed = demo_corpus.generate(str(tmp_path / "b"), n_train=2000, n_heldout=100, n_fresh=100,
                                 seed=5, shortcut_fraction=0.3)
    for split in ("heldout", "fresh"):
        assert _read(base[split]) == _read(mixed[split])
    col, short = _read(base["train"]), _read(mixed["train"])
    assert [r["problem"] for r in col] == [r["problem"] for r in short]
    rewritten = [(a, b) for a, b in zip(col, short) if b["style"] == "shortcut"]
    multi_digit = [r for r in col if r["difficulty"] >= 2]
    assert 0.25 < len(rewritten) / len(multi_digit) < 0.35
    for a, b in rewritten:
        assert b["difficulty"] >= 2 and b["answer"] == a["answer"]
        assert "Ones" not in b["solution"] and len(b["solution"]) < len(a["solution"])
        for x, op, y, z in EQUATION.findall(b["solution"]):
            assert OPS[op](int(x), int(y)) == int(z)
        wrong = demo_corpus.wrong_solution(b, random.Random(0))
        assert "Ones" not in wrong["solution"] and wrong["rollout_answer"] != b["answer"]
    assert {b["solution"] for a, b in zip(col, short) if b["style"] == "column"} <= \
        {a["solution"] for a in col}


def test_shortcut_copies_keep_every_column_solution(tmp_path):
    """shortcut_mode "add": the column corpus unchanged and in order, each chosen problem followed
    by its shortcut copy (the same choices as "replace")."""
    base = _read(demo_corpus.generate(str(tmp_path / "a"), n_train=1000, n_heldout=50,
                                      seed=2)["train"])
    replaced = _read(demo_corpus.generate(str(tmp_path / "b"), n_train=1000, n_heldout=50, seed=2,
                                          shortcut_fraction=0.3)["train"])
    added = _read(demo_corpus.generate(str(tmp_path / "c"), n_train=1000, n_heldout=50, seed=2,
                                       shortcut_fraction=0.3, shortcut_mode="add")["train"])
    assert [r for r in added if r["style"] == "column"] == base
    copies = [(a, b) for a, b in zip(added, added[1:]) if b["style"] == "shortcut"]
    assert [b for _, b in copies] == [r for r in replaced if r["style"] == "shortcut"]
    assert all(a["problem"] == b["problem"] and a["style"] == "column" for a, b in copies)
    with pytest.raises(ValueError, match="shortcut mode"):
        demo_corpus.generate(str(tmp_path / "d"), n_train=10, n_heldout=5, seed=2,
                             shortcut_fraction=0.3, shortcut_mode="both")
