"""The recipe: stage 1 (mid-training) -> 2 (SFT) -> 3 (rollout DPO) -> 4 (RL), each initialised
from the previous stage's checkpoint and evaluated on the same held-out problems; writes the
paper-style table (markdown + JSON), PNGs of the loss per stage and of RL reward/temperature,
and exports the final model as an HF directory. Rerunning skips finished stages.

  python -m phimr_jax.main --config=configs/recipe.py --config.workdir=runs/demo
Stage settings are the stages' own presets, overridable as --config.stages.sft.total_steps=100;
the seed is the recipe's (--config.seed), set on every stage.
"""

import importlib.util
import os

from ml_collections import ConfigDict

from phimr_jax.train.config_base import base_config, wandb_config

_HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("midtrain", "sft", "dpo", "rl")


def _stage_config(name, preset):
    spec = importlib.util.spec_from_file_location(f"phimr_config_{name}",
                                                  os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def get_config(arg="demo"):
    preset = arg or "demo"
    if preset == "smoke":
        return _smoke(get_config("demo"))
    if preset not in ("demo", "phi4_mini"):
        raise ValueError(f"unknown preset {preset!r}: demo | smoke | phi4_mini")
    c = base_config("recipe")
    c.workdir = "runs/demo" if preset == "demo" else ""  # Root: one sub-directory per stage.
    # Set on every stage and on the evaluation: parameter init, data order, sampling and (demo)
    # the generated corpus with its held-out problems. The README's three demo tables: 0, 1, 2.
    c.seed = 0
    # Stages to run, in order; each starts from the previous one. A tuple, so that the command
    # line can set it: --config.order="('midtrain', 'sft')".
    c.order = ORDER
    # Where stage 1 starts: "" = its own config (demo: a fresh demo model; phi4_mini: set
    # --config.stages.midtrain.init.hf_dir=PHI4_MINI_DIR).
    c.stages = ConfigDict({name: _stage_config(name, preset) for name in ORDER})
    if preset == "demo":
        # No evaluations inside the stages: the recipe scores every stage on the held-out
        # problems itself (the stages' greedy 64-problem checks, DPO's held-out pair scoring
        # and preference metrics took ~30 s of the demo's 10 minutes). The standalone stage
        # presets keep theirs; --config.stages.dpo.eval_every_steps=40 brings DPO's back.
        for name in ORDER:
            c.stages[name].eval_every_steps = 0
            c.stages[name].eval_at_start = False
    c.eval = _stage_config("eval", "demo" if preset == "demo" else "math500")
    c.eval.dataset = ""  # Held-out problems; "" = the demo corpus' held-out file (demo).
    c.eval.name = "heldout"
    c.eval.num_samples = 4 if preset == "demo" else 8  # k samples per problem for pass@1.
    c.eval.limit = 0  # Evaluate the first N held-out problems after each stage (0 = all).
    # A first row for the model stage 1 starts from: Phi-4-mini's own score (phi4_mini). The
    # demo's start is a random init, which scores 0.0 and takes ~20 s of the demo's 10 minutes
    # to say so (it never stops, so every sample runs to max_new_tokens): off.
    c.eval_start_row = preset != "demo"
    # Each stage's held-out evaluation runs in a worker thread while the next stage trains (one
    # process only; the rows and their numbers are the same). Off for phi4_mini: on an
    # accelerator the evaluation's KV cache would share memory with the next stage's training.
    c.eval_in_background = preset == "demo"
    c.export_dir = "hf_model"  # The last stage exported here for transformers ("" = skip).
    # W&B for every stage (one run per stage, grouped by the recipe's directory name).
    c.wandb = wandb_config()
    return c


def _smoke(c):
    """The demo recipe shrunk to a check that every stage runs (CI, the notebook under
    PHIMR_NOTEBOOK_PRESET=smoke): a few steps per stage, a tiny corpus, a tiny held-out table;
    about 1-2 minutes on 2 CPU cores. The numbers it produces mean nothing."""
    c.workdir = "runs/smoke"
    for name in c.order:
        stage = c.stages[name]
        stage.total_steps = 4
        stage.log_every_steps = 1
        stage.checkpoint_every_steps = 2
        if stage.get("eval_every_steps"):
            stage.eval_every_steps = 4  # Once, at the end.
        if "eval_at_start" in stage:
            stage.eval_at_start = False
        small = {"demo_train": 300, "demo_heldout": 16, "demo_fresh": 64, "eval_problems": 4,
                 "eval_max_new_tokens": 16}
        for key, value in small.items():
            if "data" in stage and key in stage.data:
                stage.data[key] = value
        if "rl" in stage:  # Small rollouts; a 4-step model answers (almost) nothing right, so
            # the filters would drop every group: off, the loop and its update still run.
            small = {"prompts_per_rollout": 4, "group_size": 4, "max_new_tokens": 32,
                     "length_filter": False, "rebalance": False}
            for key, value in small.items():
                if key in stage.rl:
                    stage.rl[key] = value
    # A 4-step model answers nothing right, so its own rollouts give DPO no pair: the
    # generator's pairs (right and wrong solutions of the same problem) instead.
    c.stages.dpo.dpo.demo_pairs = "whole"
    c.eval.limit = 8  # Problems in the held-out table.
    c.eval.num_samples = 1  # k.
    c.eval.max_new_tokens = 32
    return c
