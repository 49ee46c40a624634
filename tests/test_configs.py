"""Every config file and preset builds; the phi4_mini presets carry the paper's numbers."""

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"convert": [None], "export": [None], "init": ["demo", "phi4_mini"],
           "midtrain": ["demo", "phi4_mini"], "sft": ["demo", "phi4_mini"], "generate": [None],
           "bench": ["sampler", "forward", "train_step", "train_step_demo", "sampler_calls", "all",
                     "device", "device_smoke"],
           "eval": ["math500", "aime", "gpqa", "demo"],
           "dpo": ["demo", "phi4_mini"], "curate": [None, "demo"], "rl": ["demo", "phi4_mini"],
           "recipe": ["demo", "smoke", "phi4_mini"]}


def load(name, preset):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def test_every_config_file_is_listed():
    found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert found == set(PRESETS)


@pytest.mark.parametrize("name,preset", [(n, p) for n, ps in PRESETS.items() for p in ps])
def test_config_builds_and_dispatches(name, preset):
    from phimr_jax.main import STAGES
    c = load(name, preset)
    assert c.stage in STAGES
    assert set(c.mesh) == {"data", "fsdp", "tensor"}


@pytest.mark.parametrize("name,seq_len", [("midtrain", 16384), ("sft", 20480)])
def test_phi4_mini_presets_follow_the_paper(name, seq_len):
    c = load(name, "phi4_mini")
    assert c.data.seq_len == seq_len and c.data.global_batch_size == 128
    assert c.optim.learning_rate == 1e-5 and c.data.num_epochs == 5
    assert c.optim.warmup_fraction == 0.1 and c.total_steps == -1
    assert c.model.preset == "phi4_mini" and c.model.param_dtype == "float32"


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown preset"):
        load("midtrain", "huge")
