"""The command line as typed by a new user: no --config.workdir, from a fresh directory."""

import os
import subprocess
import sys

import pytest

from phimr_jax.main import _preset
from phimr_jax.train import checkpointing
from phimr_jax.train.config_base import default_workdir
from phimr_jax.train.metrics import read_metrics
from tests.train.test_metrics import assert_tensorboard_matches_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bare(cwd, config, *extra):
    """`python -m phimr_jax.main --config=configs/<config>` run in `cwd` (a fresh directory)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "phimr_jax.main",
                           f"--config={os.path.join(ROOT, 'configs', config)}", *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config,want", [("rl.py", "demo"), ("rl.py:phi4_mini", "phi4_mini"),
                                         ("eval.py", "math500"), ("convert.py", None)])
def test_preset_is_the_given_one_or_get_configs_default(config, want):
    assert _preset(os.path.join(ROOT, "configs", config)) == want


def test_default_workdirs():
    assert default_workdir("midtrain", "demo") == os.path.join("runs", "demo", "midtrain")
    assert default_workdir("convert", None) == os.path.join("runs", "convert")
    # The recipe's root holds its stages where the stage configs' own defaults are.
    assert os.path.join(default_workdir("recipe", "demo"), "dpo") == \
        default_workdir("dpo", "demo")


def test_bare_midtrain_command_trains_in_the_default_run_directory(tmp_path):
    res = _bare(tmp_path, "midtrain.py", "--config.total_steps=2")
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs" / "demo" / "midtrain"
    assert f"midtrain: run directory {run} (the default" in res.stderr
    assert checkpointing.latest_step(str(run)) == 2
    assert read_metrics(str(run))[-1]["step"] == 2
    got = assert_tensorboard_matches_metrics(run)
    assert "eval/accuracy" in got  # the end-of-run evaluation is in TensorBoard too
    assert "step 2/2  loss " in res.stderr and "  grad norm " in res.stderr


def test_bare_rl_command_names_the_command_that_makes_its_start(tmp_path):
    """RL never starts on a random init unasked: with no DPO run beside it, one line says
    which command makes one."""
    res = _bare(tmp_path, "rl.py", "--config.total_steps=2")
    assert res.returncode == 2, res.stderr[-4000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert "runs/demo/dpo has no checkpoint" in errors[0]
    assert "python -m phimr_jax.main --config=configs/recipe.py" in errors[0]
    assert "--config.rl.allow_random_init=true" in errors[0]
    assert not (tmp_path / "runs" / "demo" / "rl" / "checkpoints").exists()
