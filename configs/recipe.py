"""The recipe: stage 1 (mid-training) -> 2 (SFT) -> 3 (rollout DPO), each initialised from the
previous stage's checkpoint and evaluated on the same held-out problems; writes the paper-style
table (markdown + JSON) and a PNG of the loss per stage. Rerunning skips finished stages.

  python -m phimr_jax.main --config=configs/recipe.py --config.workdir=runs/demo
Stage settings are the stages' own presets, overridable as --config.stages.sft.total_steps=100.
Stage 4 (RL) joins the chain when it exists (issue 6).
"""

import importlib.util
import os

from ml_collections import ConfigDict

from phimr_jax.train.config_base import base_config

_HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("midtrain", "sft", "dpo")


def _stage_config(name, preset):
    spec = importlib.util.spec_from_file_location(f"phimr_config_{name}",
                                                  os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def get_config(arg="demo"):
    preset = arg or "demo"
    if preset not in ("demo", "phi4_mini"):
        raise ValueError(f"unknown preset {preset!r}: demo | phi4_mini")
    c = base_config("recipe")
    c.workdir = "runs/demo" if preset == "demo" else ""  # Root: one sub-directory per stage.
    c.order = list(ORDER)  # Stages to run, in order; each starts from the previous one.
    # Where stage 1 starts: "" = its own config (demo: a fresh demo model; phi4_mini: set
    # --config.stages.midtrain.init.hf_dir=PHI4_MINI_DIR).
    c.stages = ConfigDict({name: _stage_config(name, preset) for name in ORDER})
    c.eval = _stage_config("eval", "demo" if preset == "demo" else "math500")
    c.eval.dataset = ""  # Held-out problems; "" = the demo corpus' held-out file (demo).
    c.eval.name = "heldout"
    c.eval.num_samples = 4 if preset == "demo" else 8  # k samples per problem for pass@1.
    c.eval.limit = 64 if preset == "demo" else 0  # Problems evaluated after each stage.
    return c
