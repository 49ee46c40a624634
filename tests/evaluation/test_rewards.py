"""Math-Verify rewards: notation equivalences and choice letters as Math-Verify 0.9 grades them,
and the pool's safety on real pathological inputs (a power tower whose comparison runs for
minutes, a nesting whose parse takes ~40 s, megabyte and binary inputs, a killed worker)."""

import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from phimr_jax.evaluation import rewards
from phimr_jax.evaluation.rewards import RewardPool, extract_answer, math_reward, verify_one

TIMEOUT = 2.0

# Real inputs that run far past any timeout (measured with Math-Verify's timeouts off, as in
# the workers): verify(17, 9^{9^{9}}) evaluates 9**387420489 and was still running at 300 s;
# parsing 5,000 nested braces takes ~36 s.
POWER_TOWER = "The answer is \\boxed{9^{9^{9}}}."
DEEP_NESTING = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT) as p:
        p.wait_ready()
        assert all(w.ready for w in p._workers)
        yield p


def _check(pool, cases):
    completions, answers, expected = zip(*cases)
    got = math_reward(list(completions), list(answers), pool=pool)
    assert got.dtype == np.float32 and got.shape == (len(cases),)
    wrong = [(c, a, e, g) for c, a, e, g in zip(completions, answers, expected, got)
             if g != (1.0 if e else -1.0)]
    assert not wrong, "(completion, gold, expected, got): " + repr(wrong)


# Equivalent (True) and not (False), as Math-Verify 0.9 grades them.
MATH_CASES = [
    ("\\boxed{0.5}", "1/2", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "$\\frac12$", True),  # gold with math delimiters
    ("\\boxed{\\frac{3}{4}}", "3/4", True),
    ("\\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{\\tfrac34}", "\\frac{3}{4}", True),
    ("so the answer is \\boxed{\\dfrac{3}{4}}.", "\\frac{3}{4}", True),
    ("First \\boxed{5}; no wait, recomputing: \\boxed{7}", "7", True),  # the last box counts
    ("First \\boxed{7}; no wait, recomputing: \\boxed{5}", "7", False),
    ("\\boxed{7} (the prompt said: put it in \\boxed{})", "7", True),  # empty box skipped
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1000}", "1,000", True),
    ("\\boxed{1,000,000}", "1000000", True),
    ("\\boxed{1 000}", "1000", False),  # Math-Verify reads a space as a product
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{x^2+1}", "x^2-1", False),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
    ("\\boxed{3\\sqrt{3}}", "\\sqrt{27}", True),
    ("\\boxed{1.414}", "\\sqrt{2}", False),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{(2,1)}", "(1,2)", False),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{17 \\text{ apples}}", "17", True),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{0.333333}", "1/3", True),
    ("\\boxed{0.33}", "1/3", False),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{\\frac{1}{2}}", "-\\frac{1}{2}", False),
    ("\\boxed{\\boxed{7}}", "7", True),
    ("\\fbox{7}", "7", True),
    ("\\boxed{18}", "17", False),
    ("the answer is 42", "42", True),  # no box: Math-Verify's own extraction
    ("The final answer is $\\frac{1}{2}$", "0.5", True),
    ("I cannot solve this.", "42", False),
    ("\\boxed{}", "5", False),
    ("The answer is \\boxed{7", "7", False),  # cut off at the length limit
    ("", "5", False),
]


def test_math_equivalences(pool):
    _check(pool, MATH_CASES)


def test_verify_one_is_the_pure_grader():
    for completion, gold, expected in MATH_CASES[:8] + [("\\boxed{18}", "17", False)]:
        assert verify_one(completion, gold, "math") is expected, (completion, gold)
    assert verify_one("\\boxed{\\text{(b)}}", "B", "choice")
    with pytest.raises(ValueError):
        verify_one("\\boxed{1}", "1", "essay")


def test_extract_answer():
    assert extract_answer("x \\boxed{\\frac{1}{2}} then \\boxed{\\sqrt{\\frac{a}{b}}} end") \
        == "\\sqrt{\\frac{a}{b}}"
    assert extract_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces don't count
    assert extract_answer("\\boxed { 5 }") == "5"
    assert extract_answer("\\boxed{3} and \\boxed{  }") == "3"
    assert extract_answer("\\boxed{3} then \\boxed{4") == "3"  # unclosed: skipped
    assert extract_answer("} stray \\boxed{2}") == "2"
    assert extract_answer("no box here") is None
    assert extract_answer("") is None
    assert extract_answer("\\boxed{\\text{(C)}}", mode="choice") == "C"
    assert extract_answer("\\boxed{42}", mode="choice") is None
    # Linear time on adversarial nesting (the parent runs this for choice mode).
    start = time.monotonic()
    assert extract_answer("\\boxed{" * 100_000 + "1" + "}" * 100_000) == "\\boxed{" * 99_999 \
        + "1" + "}" * 99_999
    assert extract_answer("{" * 500_000, mode="choice") is None
    assert time.monotonic() - start < 5


def test_choice_mode(pool):
    completions = ["\\boxed{B}", "\\boxed{\\text{B}}", "\\boxed{(B)}", "\\boxed{B.}",
                   "\\boxed{b}", "\\boxed{\\textbf{(B)}}", "so \\boxed{A} no, \\boxed{$B$}",
                   "\\boxed{A}", "\\boxed{C}", "\\boxed{AB}", "\\boxed{B) 4.2 eV}", "B",
                   "\\boxed{}", "", "\\boxed{B}", "\\boxed{B}"]
    answers = ["B"] * 14 + ["(B)", "E?"]
    expected = np.array([1] * 7 + [-1] * 7 + [1, -1], np.float32)
    errors = pool.num_errors
    np.testing.assert_array_equal(math_reward(completions, answers, mode="choice", pool=pool),
                                  expected)
    assert pool.num_errors == errors + 1  # the malformed gold letter
    # Without a pool, choice grading needs no workers.
    np.testing.assert_array_equal(math_reward(completions, answers, mode="choice"), expected)


def test_hanging_input_is_killed_and_chunk_mates_survive(pool):
    pool.wait_ready()  # a worker may still be replacing a killed one
    timeouts, restarts = pool.num_timeouts, pool.num_restarts
    golds = [str(n) for n in range(20, 35)]
    completions = [POWER_TOWER] + [f"so \\boxed{{{g}}}" for g in golds]
    start = time.monotonic()
    got = math_reward(completions, ["17"] + golds, pool=pool)
    elapsed = time.monotonic() - start
    assert got[0] == -1.0
    np.testing.assert_array_equal(got[1:], 1.0)  # incl. the ones sent in the hung item's chunk
    assert elapsed < TIMEOUT + 1.0, elapsed
    assert pool.num_timeouts == timeouts + 1
    assert pool.num_restarts == restarts + 1
    # Right after, with one worker still starting up, the pool grades normally.
    _check(pool, MATH_CASES[:10])


def test_slow_parse_is_killed(pool):
    pool.wait_ready()  # a worker may still be replacing a killed one
    timeouts = pool.num_timeouts
    start = time.monotonic()
    got = math_reward([DEEP_NESTING], ["1"], pool=pool)
    assert got[0] == -1.0 and time.monotonic() - start < TIMEOUT + 1.0
    assert pool.num_timeouts == timeouts + 1
    _check(pool, MATH_CASES[10:20])


def test_huge_empty_and_binary_inputs(pool):
    pool.wait_ready()  # a worker may still be replacing a killed one
    rng = random.Random(0)
    garbage = bytes(rng.getrandbits(8) for _ in range(1 << 20)).decode("utf-8", errors="replace")
    reasoning = "Let $x = 2$, so $x^2 + 1 = 5$ and we continue. " * 22_000  # ~1 MB
    cases = [
        (reasoning + "Hence \\boxed{17}.", "17", True),  # long but fine: not penalised
        (reasoning, "\\frac{355}{113}", False),  # 1 MB, no box: fallback extraction
        ("\\boxed{" + "9" * 100_000 + "}", "17", False),
        (garbage, "\\frac{355}{113}", False),
        (garbage[:1000] + "\\boxed{" + garbage[1000:5000] + "}", "17", False),
        ("\x00" * 1000, "17", False),
        ("\\boxed{\x00\x00}", "17", False),
        ("", "17", False),
        ("   \n", "17", False),
        ("\\boxed{17}", "", False),  # no gold: wrong, not an error
    ]
    start = time.monotonic()
    _check(pool, cases)
    assert time.monotonic() - start < TIMEOUT + 1.0
    errors = pool.num_errors
    got = math_reward([None, "\\boxed{17}", b"\\boxed{17}"], ["17", 17, "17"], pool=pool)
    np.testing.assert_array_equal(got, [-1.0, 1.0, -1.0])  # an int gold is fine
    assert pool.num_errors == errors + 2
    _check(pool, MATH_CASES[20:30])


def test_dead_worker_is_replaced(pool):
    restarts = pool.num_restarts
    _check(pool, MATH_CASES[:4])  # both workers ready
    for w in pool._workers:  # as the OOM killer would
        w.proc.kill()
        w.proc.wait()
    _check(pool, MATH_CASES)
    assert pool.num_restarts == restarts + 2


# Stands in for _reward_worker.py to drive the parent's bookkeeping: it answers "E" (an exception
# escaped the grader) or dies on cue.
SCRIPTED_WORKER = """
import os, pickle, struct, sys
out = os.dup(1)
os.write(out, b"R\\n")
while True:
    header = sys.stdin.buffer.read(8)
    if len(header) < 8:
        break
    _, items = pickle.loads(sys.stdin.buffer.read(struct.unpack(">Q", header)[0]))
    for completion, _, _ in items:
        if completion == "crash":
            os._exit(1)
        os.write(out, b"E\\n" if completion == "raise" else b"1\\n")
"""


def test_errors_and_crashes_with_a_scripted_worker(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPTED_WORKER)
    monkeypatch.setattr(rewards, "_WORKER_SCRIPT", str(script))
    with RewardPool(num_workers=1, timeout_s=TIMEOUT) as p:
        # First chunk: [crash, ok, ok, raise]; the three after the crash are re-sent.
        got = p.grade(["crash", "ok", "ok", "raise", "ok", "crash", "ok", "ok"], ["1"] * 8)
        np.testing.assert_array_equal(got, [0, 1, 1, 0, 1, 0, 1, 1])
        assert (p.num_errors, p.num_restarts, p.num_timeouts) == (3, 2, 0)


def test_workers_that_cannot_start(tmp_path, monkeypatch):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys; sys.exit(3)")  # as when math_verify is not installed
    monkeypatch.setattr(rewards, "_WORKER_SCRIPT", str(broken))
    with RewardPool(num_workers=1, timeout_s=TIMEOUT) as p:
        with pytest.raises(RuntimeError, match="exited during start-up"):
            p.grade(["\\boxed{1}"], ["1"])
    silent = tmp_path / "silent.py"
    silent.write_text("import sys; sys.stdin.read()")  # never says it is ready
    monkeypatch.setattr(rewards, "_WORKER_SCRIPT", str(silent))
    with RewardPool(num_workers=1, timeout_s=TIMEOUT, start_timeout_s=0.5) as p:
        with pytest.raises(RuntimeError, match="did not start"):
            p.grade(["\\boxed{1}"], ["1"])


def test_batch_of_500(pool, capsys):
    pool.wait_ready()  # a worker may still be replacing a killed one
    rng = random.Random(1)
    completions, answers, expected = [], [], []
    for _ in range(125):  # RL-like: problems with 4 sampled completions each
        p, q = rng.randint(1, 50), rng.choice([2, 4, 5, 8])
        gold = rng.choice([f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"{p / q}"])
        for _ in range(4):
            right = rng.random() < 0.5
            value = p if right else p + rng.randint(1, 3)
            answer = rng.choice([f"\\dfrac{{{value}}}{{{q}}}", f"{value}/{q}", f"{value / q}"])
            completions.append("We reason step by step. " * 40 + f"So \\boxed{{{answer}}}.")
            answers.append(gold)
            expected.append(right)
    start = time.monotonic()
    got = math_reward(completions, answers, pool=pool)
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(got > 0, expected)
    with capsys.disabled():
        print(f"\n[rewards] 500 items in {elapsed:.2f} s: {500 / elapsed:.0f} items/s "
              f"with {pool.num_workers} workers")


def test_validation_and_close():
    with pytest.raises(ValueError):
        math_reward(["\\boxed{1}"], ["1", "2"], mode="choice")
    with pytest.raises(ValueError):
        math_reward(["\\boxed{1}"], ["1"], mode="proof")
    with pytest.raises(TypeError):
        math_reward("\\boxed{1}", "1", mode="choice")
    with RewardPool(num_workers=1, timeout_s=TIMEOUT) as p:
        procs = [w.proc for w in p._workers]
        np.testing.assert_array_equal(p.grade(["\\boxed{2}"], ["2"]), [True])
    assert p.closed and all(proc.poll() is not None for proc in procs)
    with pytest.raises(RuntimeError):
        p.grade(["\\boxed{2}"], ["2"])


def test_default_pool_is_lazy_and_reused():
    """In a fresh process: importing the module and choice grading load no sympy and start no
    worker; math grading starts the default pool once and reuses it."""
    code = """
import sys
import numpy as np
import phimr_jax.evaluation.rewards as r
r.math_reward(["\\\\boxed{B}"], ["B"], mode="choice")
assert "sympy" not in sys.modules and "math_verify" not in sys.modules
assert r._default is None
a = r.math_reward(["\\\\boxed{0.5}", "\\\\boxed{3}"], ["1/2", "2"])
pids = [w.proc.pid for w in r._default._workers]
b = r.math_reward(["\\\\boxed{2}"], ["2"], timeout_s=3.0)
assert [w.proc.pid for w in r._default._workers] == pids, "workers were restarted"
assert list(a) == [1.0, -1.0] and list(b) == [1.0], (a, b)
assert "sympy" not in sys.modules and "math_verify" not in sys.modules
print("ok", len(pids))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
