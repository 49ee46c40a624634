"""configs/recipe.py end to end, the demo preset as the README runs it: the four stages chained,
stage 1 learning the task and stage 4 ending above stage 1, the table and plots written, the final
model exported for transformers (tokenizer + chat template included), reruns skip. (The smoke
preset runs in tests/test_notebook.py.)"""

import json
import os
import subprocess
import sys

import pytest

from phimr_jax.stages import recipe
from phimr_jax.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("midtrain", "sft", "dpo", "rl")


def _run(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "phimr_jax.main", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check_export_generates_like_our_sampler(hf_dir, run_dir, torch):
    """transformers loads the exported directory, its chat template gives our prompt ids, and its
    greedy continuation equals our sampler's on the final checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phimr_jax.data.tokenizers import format_prompt, load_tokenizer
    from phimr_jax.model.sampling import generate
    from phimr_jax.train.state import with_model_config
    question = "Compute 12 + 5."
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = hf_tok.apply_chat_template([{"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=False)
    assert text == format_prompt(question)
    ours = load_tokenizer("sentencepiece", os.path.join(run_dir, "..", "midtrain", "tokenizer",
                                                       "tokenizer.model"))
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.prompt_ids(question)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=hf_tok.pad_token_id)
    hf_new = out[0, len(ids):].tolist()
    model, _, _ = checkpointing.restore_model(run_dir)
    # The demo may train with bfloat16 compute over float32 weights; transformers runs the exported
    # float32 weights in float32, so ours does too for a like-for-like greedy comparison.
    model = with_model_config(model, dtype="float32")
    ours_new = generate(model, [ids], max_new_tokens=12, top_k=1, stop_tokens=[]).tokens[0]
    assert hf_new == ours_new
    assert isinstance(hf_tok.decode(hf_new), str)


@pytest.mark.slow
def test_demo_recipe_chains_four_stages_exports_and_skips_finished_ones(tmp_path, torch_cpu):
    """The README's main command as it is (the demo preset: 9.5-10 minutes on 2 Zen 4 cores
    in bfloat16, about 20 on 2 AVX2 cores in float32)."""
    args = ["--config=configs/recipe.py", f"--config.workdir={tmp_path}"]
    _run(*args, timeout=3600)  # up to 22 min on a 2-core machine (README)
    rows = json.load(open(tmp_path / "recipe.json"))
    # No start row in the demo: its start is a random init (configs/recipe.py, eval_start_row).
    assert [r["stage"] for r in rows] == [f"+ {s}" for s in STAGES]
    assert all(r["problems"] == 256 and r["k"] == 4 for r in rows)
    by_stage = {r["stage"]: r for r in rows}
    first, last = by_stage["+ midtrain"], by_stage["+ rl"]
    # Stage 1 teaches the task: on seed 0 61.1% held-out in float32 (what "auto" picks on CPUs
    # without bfloat16 units), 69-70% in bfloat16 (Zen 4), the hard tail (level 6, 2% of its
    # data) at 6-8%, one-go answers (the step-skipping teacher's style) 15% of its multi-digit
    # ones. A random init scores 0.
    assert first["pass@1"] > 0.6, first["pass@1"]
    # Issue 18's criteria on the default seed (README, "A teacher that skips steps"): each later
    # stage rises on the same problems, SFT and RL by >= 2 paired SE, DPO by >= 1 (measured on
    # seed 0: float32 on the AVX2 host +10.9 +- 1.8, +3.9 +- 0.8, +5.0 +- 1.2 (session 18's RL),
    # on the Zen 4 host +2.7 +- 1.4 (2.01 SE), +3.5 +- 0.7, +4.5 +- 1.1; bfloat16 +15.8 +- 2.2,
    # +5.3 +- 0.8, +4.2 +- 1.2 with packed RL rows), and stage 4 ends >= 8 points above stage 1
    # (19.9; 10.7; 25.3).
    for (before, after), n_se in zip(zip(STAGES, STAGES[1:]), (2, 1, 2)):
        change, se = recipe.paired_change(by_stage[f"+ {before}"]["per_problem"],
                                          by_stage[f"+ {after}"]["per_problem"])
        assert change >= n_se * se, (after, change, se)
    assert last["pass@1"] - first["pass@1"] >= 0.08, (first["pass@1"], last["pass@1"])
    text = (tmp_path / "recipe.md").read_text()
    assert "| + rl |" in text and "change vs previous row" in text
    for png in ("loss_per_stage.png", "rl_reward_temperature.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "rl" / "rl_curves.png").stat().st_size > 1000
    for stage, parent in zip(STAGES[1:], STAGES):
        _, info, _ = checkpointing.restore_model(str(tmp_path / stage))
        assert info["init"].startswith(f"run {tmp_path / parent}")
    _check_export_generates_like_our_sampler(str(tmp_path / "hf_model"), str(tmp_path / "rl"),
                                             torch_cpu)
    stamps = {s: os.path.getmtime(tmp_path / s / "DONE") for s in STAGES}
    again = _run(*args, timeout=600)
    assert "already finished, skipping" in again.stderr
    assert stamps == {s: os.path.getmtime(tmp_path / s / "DONE") for s in stamps}
    assert json.load(open(tmp_path / "recipe.json")) == rows


def test_paired_change_and_table():
    before, after = [0.0, 0.5, 1.0, 0.25], [0.5, 0.5, 1.0, 0.75]
    change, se = recipe.paired_change(before, after)
    diff = [0.5, 0.0, 0.0, 0.5]
    mean = sum(diff) / 4
    sd = (sum((d - mean) ** 2 for d in diff) / 3) ** 0.5
    assert change == pytest.approx(0.25) and se == pytest.approx(sd / 2)
    rows = [{"stage": "a", "pass@1": 0.4375, "stderr": 0.2, "problems": 4, "k": 4,
             "mean_tokens": 10.0, "by_difficulty": {"1": 0.5, "2": 0.25}, "per_problem": before},
            {"stage": "b", "pass@1": 0.6875, "stderr": 0.1, "problems": 4, "k": 4,
             "mean_tokens": 12.0, "by_difficulty": {"1": 0.75}, "per_problem": after}]
    lines = recipe.table(rows)
    assert lines[0].count("level") == 2 and len(lines) == 4
    assert lines[2].startswith("| a | 43.8 | 20.0 |  |  | 50 | 25 | 4 | 4 | 10 |")
    assert lines[3].startswith(f"| b | 68.8 | 10.0 | +25.0 ± {100 * sd / 2:.1f} |  | 75 |  | ")
    # pass@k next to pass@1, overall and per level, when the evaluation reports it.
    rows[1].update({"pass@k": 0.75, "by_difficulty_at_k": {"1": 1.0}})
    assert recipe.table(rows)[3].startswith(
        f"| b | 68.8 | 10.0 | +25.0 ± {100 * sd / 2:.1f} | 75.0 | 75 / 100 |  | ")


def test_evaluate_uses_the_returned_result_where_no_file_is_written(tmp_path, monkeypatch):
    """Only process 0 writes workdir/eval/<name>.json; every process builds the table row from
    what the eval harness returns, so a process that wrote nothing still gets its row."""
    from ml_collections import ConfigDict

    from phimr_jax.evaluation import harness as evaluation
    result = {"summary": {"pass@1": 0.5, "stderr": 0.25, "problems": 2, "samples_per_problem": 2,
                          "mean_tokens": 7.0, "pass@1_by_difficulty": {"1": 0.5}},
              "problems": [{"pass@1": 1.0}, {"pass@1": 0.0}]}
    monkeypatch.setattr(evaluation, "run", lambda ev: result)  # returns, writes no file
    config = ConfigDict({"eval": {"name": "heldout"}, "mesh": {}, "sharding_rules": [],
                         "seed": 0})
    row = recipe._evaluate(config, str(tmp_path), "problems.jsonl", "+ sft")
    assert row["per_problem"] == [1.0, 0.0] and row["pass@1"] == 0.5
    assert row["by_difficulty"] == {"1": 0.5} and row["k"] == 2


def test_recipe_seed_reaches_every_stage_and_the_evaluation(tmp_path, monkeypatch):
    """--config.seed=N sets every stage's seed (init, data order, the demo corpus and its
    held-out problems) and the evaluation's sampling seed: the README's three demo tables are
    seeds 0, 1 and 2 of the same command."""
    from phimr_jax.evaluation import harness as evaluation
    from tests.test_configs import load
    config = load("recipe", "demo")
    config.workdir, config.seed, config.export_dir = str(tmp_path), 2, ""
    config.stages.midtrain.init.checkpoint = str(tmp_path / "given")  # no start row to build
    seen = {}

    def fake_stage(name, stage):
        os.makedirs(stage.workdir)
        seen[name] = stage.seed
        seen.setdefault("corpus", set()).add(stage.data.demo_dir)
    monkeypatch.setattr(recipe, "_run_stage", fake_stage)
    result = {"summary": {"pass@1": 0.5, "stderr": 0.1, "problems": 1, "samples_per_problem": 1,
                          "mean_tokens": 5.0}, "problems": [{"pass@1": 0.5}]}

    def fake_eval(ev):
        seen.setdefault("eval", set()).add(ev.seed)
        seen.setdefault("heldout", set()).add(ev.dataset)
        return result
    monkeypatch.setattr(evaluation, "run", fake_eval)
    monkeypatch.setattr(recipe, "_plot", lambda *a: None)
    monkeypatch.setattr(recipe, "_plot_rl", lambda *a: None)
    rows = recipe.run(config)
    # One demo corpus for every stage (generated once, with the recipe's seed); the table
    # scores its held-out file.
    (corpus,), (heldout,) = seen.pop("corpus"), seen.pop("heldout")
    assert corpus == str(tmp_path / "demo_data") and os.path.dirname(heldout).startswith(corpus)
    assert os.listdir(corpus) == [os.path.basename(os.path.dirname(heldout))]
    assert seen == {"midtrain": 2, "sft": 2, "dpo": 2, "rl": 2, "eval": {2}}
    # The demo's table has no start row (a random init); eval_start_row (phi4_mini's default:
    # the base model's score) puts the model stage 1 starts from first.
    assert not config.eval_start_row and [r["stage"] for r in rows] == \
        ["+ midtrain", "+ sft", "+ dpo", "+ rl"]
    assert load("recipe", "phi4_mini").eval_start_row
    config.eval_start_row, config.workdir = True, str(tmp_path / "with_start")
    rows = recipe.run(config)
    assert [r["stage"] for r in rows] == ["start (before stage 1)", "+ midtrain", "+ sft",
                                          "+ dpo", "+ rl"]


def test_a_preempted_stage_is_not_marked_done_and_the_recipe_stops(tmp_path, monkeypatch):
    """SIGTERM in stage 1 (`trainer.Preempted` after its save): no DONE marker, no stage 2, and
    the process exits with status 0; the rerun runs stage 1 again (it resumes from its save)."""
    from phimr_jax.train import trainer
    from tests.test_configs import load
    config = load("recipe", "demo")
    config.workdir, config.export_dir = str(tmp_path), ""
    ran = []

    def preempted_stage(name, stage):
        os.makedirs(stage.workdir, exist_ok=True)
        ran.append(name)
        raise trainer.Preempted(31)
    monkeypatch.setattr(recipe, "_run_stage", preempted_stage)
    with pytest.raises(SystemExit) as stop:
        recipe.run(config)
    assert stop.value.code == 0 and ran == ["midtrain"]
    assert not (tmp_path / "midtrain" / "DONE").exists()
    with pytest.raises(SystemExit):
        recipe.run(config)
    assert ran == ["midtrain", "midtrain"]


def test_background_evaluations_overlap_the_next_stage_keep_order_and_raise(tmp_path,
                                                                             monkeypatch):
    """eval_in_background (the demo's default): stage N's held-out evaluation runs in a worker
    thread while stage N+1 trains, the rows keep stage order, and an evaluation's error stops
    the recipe."""
    import threading

    from phimr_jax.evaluation import harness as evaluation
    from tests.test_configs import load
    config = load("recipe", "demo")
    assert config.eval_in_background and not load("recipe", "phi4_mini").eval_in_background
    config.workdir, config.export_dir = str(tmp_path), ""
    config.stages.midtrain.init.checkpoint = str(tmp_path / "given")
    events, release = [], {}

    def fake_stage(name, stage):
        os.makedirs(stage.workdir)
        events.append(("train", name, threading.current_thread().name))
        if name == "sft":  # stage 1's evaluation waits until stage 2 has started
            release["midtrain"].set()

    def fake_eval(ev):
        name = os.path.basename(ev.checkpoint)
        gate = release.setdefault(name, threading.Event())
        if name == "midtrain":
            assert gate.wait(10), "stage 1's evaluation never overlapped stage 2"
        events.append(("eval", name, threading.current_thread().name))
        if name == "dpo" and config.get("fail"):
            raise RuntimeError("evaluation failed")
        return {"summary": {"pass@1": 0.5, "stderr": 0.1, "problems": 1,
                            "samples_per_problem": 1, "mean_tokens": 5.0},
                "problems": [{"pass@1": len(name) / 10}]}
    release["midtrain"] = threading.Event()
    monkeypatch.setattr(recipe, "_run_stage", fake_stage)
    monkeypatch.setattr(evaluation, "run", fake_eval)
    monkeypatch.setattr(recipe, "_plot", lambda *a: None)
    monkeypatch.setattr(recipe, "_plot_rl", lambda *a: None)
    rows = recipe.run(config)
    assert [r["stage"] for r in rows] == [f"+ {s}" for s in STAGES]
    assert [r["per_problem"] for r in rows] == [[len(s) / 10] for s in STAGES]
    evals = [e for e in events if e[0] == "eval"]
    assert [e[1] for e in evals] == list(STAGES)
    assert all(e[2] != threading.main_thread().name for e in evals)
    assert events.index(("train", "sft", threading.main_thread().name)) < \
        events.index(evals[0])
    config.fail, config.workdir = True, str(tmp_path / "again")
    release.clear()
    release["midtrain"] = threading.Event()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        recipe.run(config)
