"""checkpointing.latest_step: read from the directory alone, since every process of a
multi-host job calls it while another process's trainer may be creating that directory."""

import os

import orbax.checkpoint as ocp
import pytest

from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import init_model
from phimr_jax.train import checkpointing


def test_latest_step_is_the_newest_finalized_step_and_opens_no_manager(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    assert checkpointing.latest_step(run) is None  # no directory
    model = init_model(mc.tiny(), seed=0)
    for step in (3, 7):
        checkpointing.save_model(run, model, step, checkpointing.run_info(model, "test"))
    # A save still in flight (orbax's temporary name) is not a checkpoint yet.
    os.makedirs(os.path.join(checkpointing.checkpoint_dir(run), "9.orbax-checkpoint-tmp-123"))

    def no_manager(*args, **kwargs):  # creating one is a collective over every process
        raise AssertionError("latest_step opened a CheckpointManager")
    monkeypatch.setattr(ocp, "CheckpointManager", no_manager)
    assert checkpointing.latest_step(run) == 7
    empty = tmp_path / "empty"
    os.makedirs(checkpointing.checkpoint_dir(str(empty)))
    assert checkpointing.latest_step(str(empty)) is None
    with pytest.raises(AssertionError):  # the guard itself works
        checkpointing.manager(run)
