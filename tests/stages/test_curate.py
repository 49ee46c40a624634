"""Curation stage: exact counts on a hand-made rollout file (correct, wrong, unanswered, a rollout
that hangs Math-Verify, malformed records, a rollout list field), filters and pairing policies,
resume after an interruption, Parquet input, and the demo preset end to end through the CLI."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from phimr_jax.evaluation.rewards import RewardPool, math_reward
from phimr_jax.stages import curate as cur
from phimr_jax.stages import curate_io as cio
from tests.data import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 2.0
TOWER = "Powers: \\boxed{9^{9^{9}}}"  # verify(17, 9^(9^9)) runs for minutes: must time out
LONG = "Checking every step twice. " * 20 + "So \\boxed{17}"
P1, P2, P3 = "What is 2 + 3?", "Compute 1/2 + 1/4.", "What is 17?"
P4, P5 = "What is 4 + 6?", "What is 3 * 3?"


def _rec(problem, answer, rollout, difficulty=None, domain=None):
    out = {"q": problem, "gold": answer, "gens": rollout}
    if difficulty is not None:
        out["level"] = difficulty
    if domain is not None:
        out["area"] = domain
    return out


# 13 lines: 8 valid records, 4 malformed, 1 blank (no record); 12 rollouts: correct 6, wrong 5
# (one of them the tower: a timeout), no boxed answer 1. With chunk_size 3: 4 chunks.
VALID = [
    _rec(P1, "5", "2 + 3 = 5, so \\boxed{5}", 1, "arithmetic"),  # correct
    _rec(P2, "3/4", ["0.5 + 0.25 = \\boxed{0.75}", "\\boxed{\\frac{3}{4}}"], 4, "algebra"),  # 2 ok
    _rec(P1, "5", ["\\boxed{6}", "Adding: \\boxed{5}", "the answer is five"], 1, "arithmetic"),
    _rec(P3, "17", TOWER, 5, "algebra"),  # wrong by timeout
    _rec(P4, "10", "\\boxed{11}"),  # wrong; no difficulty, no domain; P4 has no correct rollout
    _rec(P5, 9, ["3 * 3 = \\boxed{9}"], "Level 3", "arithmetic"),  # a numeric gold answer
    _rec(P2, "3/4", ["\\boxed{1}", "\\boxed{3/5}"], 4, "algebra"),  # 2 wrong
    _rec(P3, "17", LONG, 5, "algebra"),  # correct, over 500 characters
]
MALFORMED = ["this is not json", json.dumps({"q": P1, "gens": "\\boxed{5}"}),  # no answer
             json.dumps(_rec(P1, "5", ["\\boxed{5}", 5])), json.dumps([1, 2])]
LINES = [json.dumps(r) for r in VALID[:3]] + MALFORMED[:2] + [""] + \
        [json.dumps(r) for r in VALID[3:6]] + MALFORMED[2:] + [json.dumps(r) for r in VALID[6:]]
FIELDS = {"problem": "q", "answer": "gold", "rollout": "gens", "difficulty": "level",
          "domain": "area"}

EXPECTED = {
    "records": {"seen": 12, "valid": 8, "malformed_skipped": 4},
    "rollouts": {"seen": 12, "correct": 6, "incorrect": 6, "wrong": 5, "no_answer": 1,
                 "graded": 11, "timeouts": 1, "grader_errors": 0},
    "problems": {"seen": 5, "with_correct": 4, "with_both": 3},
    "accuracy_by_domain": {"algebra": {"rollouts": 6, "correct": 3, "accuracy": 0.5},
                           "arithmetic": {"rollouts": 5, "correct": 3, "accuracy": 0.6},
                           "none": {"rollouts": 1, "correct": 0, "accuracy": 0.0}},
    "accuracy_by_difficulty": {"1": {"rollouts": 4, "correct": 2, "accuracy": 0.5},
                               "Level 3": {"rollouts": 1, "correct": 1, "accuracy": 1.0},
                               "4": {"rollouts": 4, "correct": 2, "accuracy": 0.5},
                               "5": {"rollouts": 2, "correct": 1, "accuracy": 0.5},
                               "none": {"rollouts": 1, "correct": 0, "accuracy": 0.0}},
}


class CountingPool:
    """A RewardPool that counts the rollouts sent to it (to prove resumed chunks are not
    regraded)."""

    def __init__(self, pool):
        self.pool, self.graded = pool, 0

    def grade(self, completions, answers, mode="math", **kw):
        self.graded += len(completions)
        return self.pool.grade(completions, answers, mode, **kw)

    def __getattr__(self, name):  # num_timeouts, num_errors
        return getattr(self.pool, name)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT) as p:
        yield p


def _config(workdir, rollouts, **overrides):
    spec = importlib.util.spec_from_file_location("curate_config",
                                                  os.path.join(ROOT, "configs", "curate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(None)
    c.workdir, c.rollouts, c.skip_malformed = str(workdir), str(rollouts), True
    c.fields.update(FIELDS)
    c.chunk_size, c.grader_timeout_s = 3, TIMEOUT
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = c if not path else c[node]
        target[path[-1] if path else node] = value
    return c


def _outputs(workdir):
    return {name: open(os.path.join(workdir, f)).read() for name, f in cio.OUTPUTS.items()}


def _lines(workdir, name):
    return [json.loads(x) for x in open(os.path.join(workdir, cio.OUTPUTS[name]))]


@pytest.fixture(scope="module")
def base(tmp_path_factory, pool):
    """One full run on the hand-made file: (input path, workdir, report, grader counter)."""
    tmp = tmp_path_factory.mktemp("curate")
    path = write_jsonl(str(tmp / "rollouts.jsonl"), LINES)
    counting = CountingPool(pool)
    report = cur.curate(_config(tmp / "run", path), pool=counting)
    return path, str(tmp / "run"), report, counting


def test_exact_counts_and_outputs(base):
    _, workdir, report, counting = base
    for section, expected in EXPECTED.items():
        got = {k: v for k, v in report[section].items() if k != "malformed_examples"}
        assert got == expected, section
    assert len(report["records"]["malformed_examples"]) == 4
    assert "rollouts.jsonl:4: invalid JSON" in report["records"]["malformed_examples"][0]
    assert report["outputs"] == {"midtrain": 6, "sft": 6, "sft_problems": 4, "dpo_pairs": 3,
                                 "dpo_problems": 3}
    assert report["run"]["rollouts_graded_this_run"] == counting.graded == 11
    assert report["run"]["chunks"] == 4 and report["run"]["chunks_reused"] == 0
    assert json.load(open(os.path.join(workdir, "report.json"))) == report
    mid = _lines(workdir, "midtrain")
    assert [r["problem"] for r in mid] == [P1, P2, P2, P1, P5, P3]  # input order
    assert mid[0] == {"problem": P1, "solution": "2 + 3 = 5, so \\boxed{5}", "answer": "5",
                      "difficulty": 1, "domain": "arithmetic"}
    assert mid[4]["answer"] == "9" and mid[4]["difficulty"] == "Level 3"
    pairs = _lines(workdir, "dpo_pairs")
    assert sorted(p["problem"] for p in pairs) == sorted([P1, P2, P3])
    tower = next(p for p in pairs if p["problem"] == P3)
    assert tower["chosen"] == LONG and tower["rejected"] == TOWER and tower["difficulty"] == 5
    for p in pairs:
        assert set(p) == {"problem", "chosen", "rejected", "answer", "difficulty", "domain"}
    assert "the answer is five" not in {p["rejected"] for p in pairs}  # no answer: not rejected
    assert "| rollouts.timeouts | 1 |" in cur.markdown(report)


def _rerun(base, tmp_path, pool, **overrides):
    """The base run's chunks, finished again with other sft / dpo settings (never regraded)."""
    path, workdir, _, _ = base
    work = tmp_path / "rerun"
    shutil.copytree(workdir, work)
    counting = CountingPool(pool)
    report = cur.curate(_config(work, path, **overrides), pool=counting)
    assert counting.graded == 0 and report["run"]["chunks_reused"] == 4
    return str(work), report


@pytest.mark.parametrize("overrides,sft,sft_problems", [
    ({"sft.min_difficulty": 3.0}, 4, 3),  # P2 (4) x2, P5 ("Level 3"), P3 (5)
    ({"sft.min_difficulty": 3.0, "sft.max_chars": 200}, 3, 2),  # the long P3 rollout dropped
    ({"sft.min_difficulty": 3.0, "sft.max_per_problem": 1}, 3, 3),
    ({"sft.domains": "arithmetic, geometry"}, 3, 2),  # P1 x2, P5
])
def test_sft_filters(base, tmp_path, pool, overrides, sft, sft_problems):
    workdir, report = _rerun(base, tmp_path, pool, **overrides)
    assert (report["outputs"]["sft"], report["outputs"]["sft_problems"]) == (sft, sft_problems)
    assert len(_lines(workdir, "sft")) == sft
    assert report["outputs"]["midtrain"] == 6  # filters never touch stage 1


@pytest.mark.parametrize("overrides,pairs,problems", [
    ({"dpo.policy": "all", "dpo.max_pairs_per_problem": 0}, 2 + 4 + 1, 3),
    ({"dpo.policy": "all", "dpo.max_pairs_per_problem": 3}, 2 + 3 + 1, 3),
    ({"dpo.policy": "all", "dpo.max_pairs_per_problem": 0, "dpo.rejected_needs_answer": False},
     4 + 4 + 1, 3),
    ({"dpo.policy": "all", "dpo.max_pairs_per_problem": 0, "dpo.min_difficulty": 4.5}, 1, 1),
    ({"dpo.policy": "one", "dpo.min_difficulty": 4.0}, 2, 2),
])
def test_dpo_policies(base, tmp_path, pool, overrides, pairs, problems):
    workdir, report = _rerun(base, tmp_path, pool, **overrides)
    assert (report["outputs"]["dpo_pairs"], report["outputs"]["dpo_problems"]) == (pairs, problems)
    got = _lines(workdir, "dpo_pairs")
    assert len(got) == pairs
    assert len({(p["chosen"], p["rejected"]) for p in got}) == pairs  # no duplicate pair
    rest = [p for p in got if p["rejected"] != TOWER]  # the tower would only time out again
    regraded = math_reward([p["chosen"] for p in got] + [p["rejected"] for p in rest],
                           [p["answer"] for p in got + rest], pool=pool, timeout_s=TIMEOUT)
    assert list(regraded) == [1.0] * pairs + [-1.0] * len(rest)


def test_pairing_is_deterministic_given_the_seed(base, tmp_path, pool):
    overrides = {"dpo.policy": "all", "dpo.max_pairs_per_problem": 3}
    a = _outputs(_rerun(base, tmp_path / "a", pool, **overrides)[0])["dpo_pairs"]
    b = _outputs(_rerun(base, tmp_path / "b", pool, **overrides)[0])["dpo_pairs"]
    assert a == b
    picks = {_outputs(_rerun(base, tmp_path / f"s{s}", pool, seed=s, **overrides)[0])["dpo_pairs"]
             for s in range(1, 6)}
    assert len(picks) > 1  # 3 of P2's 4 pairs: the seed changes which


def test_many_buckets_give_the_same_datasets(base, tmp_path, pool, monkeypatch):
    monkeypatch.setattr(cio, "FLUSH_BYTES", 300)  # appends to the bucket files several times
    workdir, report = _rerun(base, tmp_path, pool, bucket_mb=0.0005)
    assert report["run"]["buckets"] >= 4
    assert {k: v for k, v in report.items() if k != "run"} == \
        {k: v for k, v in base[2].items() if k != "run"}
    ours, theirs = _outputs(workdir), _outputs(base[1])
    assert ours["midtrain"] == theirs["midtrain"]  # input order, whatever the buckets
    for name in ("sft", "dpo_pairs"):  # grouped by bucket: same records, maybe another order
        assert sorted(ours[name].splitlines()) == sorted(theirs[name].splitlines())


def test_resume_after_interruption_equals_uninterrupted_run(base, tmp_path, pool):
    path, workdir, full, _ = base
    work = tmp_path / "resumed"
    counting = CountingPool(pool)
    assert cur.curate(_config(work, path, stop_after_chunks=2), pool=counting) is None
    chunks = os.path.join(work, cio.CHUNK_DIR)
    assert sorted(f for f in os.listdir(chunks) if f.endswith(".done")) == ["00000.done",
                                                                            "00001.done"]
    assert not os.path.exists(os.path.join(work, "midtrain.jsonl"))
    first_graded = counting.graded
    mtimes = {f: os.stat(os.path.join(chunks, f)).st_mtime_ns for f in os.listdir(chunks)}

    report = cur.curate(_config(work, path), pool=counting)
    assert report["run"]["chunks_reused"] == 2
    assert counting.graded == 11 == first_graded + report["run"]["rollouts_graded_this_run"]
    for f, t in mtimes.items():  # finished chunks were neither regraded nor rewritten
        assert os.stat(os.path.join(chunks, f)).st_mtime_ns == t, f
    assert _outputs(work) == _outputs(workdir)
    assert {k: v for k, v in report.items() if k != "run"} == \
        {k: v for k, v in full.items() if k != "run"}

    os.remove(os.path.join(chunks, "00002.done"))  # a chunk killed before its marker
    before = counting.graded
    again = cur.curate(_config(work, path), pool=counting)
    assert again["run"]["chunks_reused"] == 3
    assert counting.graded - before == again["run"]["rollouts_graded_this_run"] > 0
    assert _outputs(work) == _outputs(workdir)


def test_other_input_or_chunking_is_refused_unless_overwrite(base, tmp_path, pool):
    path, workdir, _, _ = base
    work = tmp_path / "w"
    shutil.copytree(workdir, work)
    with pytest.raises(ValueError, match="overwrite"):
        cur.curate(_config(work, path, chunk_size=7), pool=pool)
    report = cur.curate(_config(work, path, chunk_size=7, overwrite=True), pool=pool)
    assert report["run"]["chunks"] == 2 and report["run"]["chunks_reused"] == 0
    assert _outputs(work) == _outputs(workdir)  # chunking does not change the outputs


def test_malformed_record_fails_with_file_and_line(tmp_path, pool):
    path = write_jsonl(str(tmp_path / "r.jsonl"), LINES)
    with pytest.raises(cur.DataError, match=r"r\.jsonl:4: invalid JSON"):
        cur.curate(_config(tmp_path / "w", path, skip_malformed=False, chunk_size=100), pool=pool)


def test_parquet_input(base, tmp_path, pool):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"q": r["q"], "gold": str(r["gold"]),  # one type per column: lists, string levels
             "gens": r["gens"] if isinstance(r["gens"], list) else [r["gens"]],
             "level": str(r["level"]) if "level" in r else None, "area": r.get("area")}
            for r in VALID]
    rows.insert(2, {"q": P1, "gold": None, "gens": ["\\boxed{5}"], "level": "1", "area": None})
    path = str(tmp_path / "r.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    report = cur.curate(_config(tmp_path / "w", path), pool=pool)
    for section in ("rollouts", "problems", "accuracy_by_domain", "accuracy_by_difficulty"):
        assert report[section] == base[2][section], section
    assert report["records"]["malformed_skipped"] == 1 and report["records"]["valid"] == 8
    assert report["outputs"] == base[2]["outputs"]
    assert [r["solution"] for r in _lines(tmp_path / "w", "midtrain")] == \
        [r["solution"] for r in _lines(base[1], "midtrain")]


def test_demo_preset_end_to_end(tmp_path, pool):
    work = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "phimr_jax.main", "--config=configs/curate.py:demo",
         f"--config.workdir={work}", "--config.demo_problems=60", "--config.chunk_size=16"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True,
        text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| outputs.dpo_pairs |" in res.stdout
    report = json.load(open(work / "report.json"))
    records = [json.loads(x) for x in open(work / cio.DEMO_DIR / "rollouts.jsonl")]
    assert report["rollouts"]["correct"] == report["outputs"]["midtrain"] == 60
    assert report["rollouts"]["incorrect"] == report["rollouts"]["wrong"] == \
        sum(len(r["rollout"]) if isinstance(r["rollout"], list) else 1 for r in records) - 60
    assert report["problems"]["with_both"] == report["problems"]["seen"] > 50
    assert report["records"]["seen"] == len(records) > 60  # rollouts spread over records
    assert {type(r["rollout"]) for r in records} == {str, list}
    sft = _lines(work, "sft")
    assert sft and all(r["difficulty"] >= 3 for r in sft)
    pairs = _lines(work, "dpo_pairs")
    assert len(pairs) == report["outputs"]["dpo_pairs"] >= report["problems"]["with_both"]
    scores = math_reward([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                         [p["answer"] for p in pairs] * 2, pool=pool, timeout_s=TIMEOUT)
    assert list(scores) == [1.0] * len(pairs) + [-1.0] * len(pairs)


def test_teacher_rollouts_are_sampled_once_then_curated(tmp_path, pool, torch_cpu):
    from phimr_jax.model import config as mc
    from tests.data import hf_tokenizer_dir
    from tests.hf_reference import make_hf_model
    hf_dir = str(tmp_path / "hf")
    make_hf_model(mc.tiny(), seed=0).save_pretrained(hf_dir)
    for name in os.listdir(hf_tokenizer_dir()):
        shutil.copy(os.path.join(hf_tokenizer_dir(), name), hf_dir)
    problems = write_jsonl(str(tmp_path / "p.jsonl"), [
        {"q": q, "gold": a, "level": d} for q, a, d in ((P1, "5", 1), (P3, "17", 5), (P5, "9", 3))])
    config = _config(tmp_path / "w", "", problems=problems, chunk_size=2)
    config.teacher.update(hf_dir=hf_dir, num_samples=2, max_new_tokens=6, batch_size=2,
                          dtype="float32")
    report = cur.curate(config, pool=pool)
    teacher_dir = tmp_path / "w" / cur.TEACHER_DIR
    assert sorted(os.listdir(teacher_dir)) == ["00000.jsonl", "00001.jsonl"]
    records = [json.loads(x) for f in sorted(os.listdir(teacher_dir)) for x in
               open(teacher_dir / f)]
    assert [(r["problem"], r["answer"], r["difficulty"]) for r in records] == \
        [(P1, "5", 1), (P3, "17", 5), (P5, "9", 3)]
    assert all(len(r["rollout"]) == 2 and all(isinstance(t, str) for t in r["rollout"])
               for r in records)
    assert report["inputs"]["problems_malformed"] == 0
    assert report["records"]["valid"] == 3 and report["problems"]["seen"] == 3
    rollouts = report["rollouts"]
    assert rollouts["seen"] == 6 == rollouts["correct"] + rollouts["wrong"] + rollouts["no_answer"]
    mtimes = {f: os.stat(teacher_dir / f).st_mtime_ns for f in os.listdir(teacher_dir)}
    config.teacher.hf_dir = str(tmp_path / "gone")  # a rerun must not load the teacher again
    config.teacher.checkpoint = ""
    again = cur.curate(config, pool=pool)
    assert again["run"]["chunks_reused"] == again["run"]["chunks"] == 2
    assert {f: os.stat(teacher_dir / f).st_mtime_ns for f in os.listdir(teacher_dir)} == mtimes
