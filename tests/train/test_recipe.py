"""configs/recipe.py end to end (shortened): stages chained, table written, reruns skip."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["--config.stages.midtrain.total_steps=10", "--config.stages.sft.total_steps=5",
         "--config.stages.dpo.total_steps=5", "--config.eval.limit=4",
         "--config.eval.max_new_tokens=16"] + [
    f"--config.stages.{s}.data.demo_train=300" for s in ("midtrain", "sft", "dpo")]


@pytest.mark.slow
def test_recipe_chains_stages_and_skips_finished_ones(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "phimr_jax.main", "--config=configs/recipe.py",
           f"--config.workdir={tmp_path}", *SHORT]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.load(open(tmp_path / "recipe.json"))
    assert [r["stage"] for r in rows] == ["start (before stage 1)", "+ midtrain", "+ sft",
                                          "+ dpo"]
    assert all(r["problems"] == 4 and r["k"] == 4 and 0 <= r["pass@1"] <= 1 for r in rows)
    assert "| + dpo |" in (tmp_path / "recipe.md").read_text()
    assert (tmp_path / "loss_per_stage.png").stat().st_size > 1000
    from phimr_jax.train import checkpointing
    for stage, parent in (("sft", "midtrain"), ("dpo", "sft")):
        _, info, step = checkpointing.restore_model(str(tmp_path / stage))
        assert info["init"].startswith(f"run {tmp_path / parent}") and step == 5
    stamps = {s: os.path.getmtime(tmp_path / s / "DONE") for s in ("midtrain", "sft", "dpo")}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished, skipping" in again.stderr
    assert stamps == {s: os.path.getmtime(tmp_path / s / "DONE") for s in stamps}
    assert json.load(open(tmp_path / "recipe.json")) == rows
