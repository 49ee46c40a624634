"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{params, run_info, ...}`.

Every run (convert, the training stages) writes the same layout, so export and the next stage
can read any of them:
- `params`: the model's nnx.Param state as a pure dict of (sharded) arrays (StandardSave);
- `run_info`: JSON with the full ModelConfig (`model`), the stage, `tokenizer_dir` when the
  run knows its tokenizer, and `param_layout` when `params` holds more than the policy (a PPO
  run's critic; see model/actor_critic.py) — `restore_model` returns the policy either way;
- trainers add their own items (optimizer state, step, RNG, data iterator) beside these.
Restoring places each array straight into its target sharding; nothing is gathered.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from phimr_jax.model.actor_critic import PARAM_LAYOUTS, abstract_for_layout
from phimr_jax.model.config import ModelConfig
from phimr_jax.model.phi3 import Phi3ForCausalLM
from phimr_jax.model.sharding import DEFAULT_RULES, state_shardings


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, max_to_keep: Optional[int] = None, async_save: bool = True,
            item_names=("params", "run_info")) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=item_names)


def run_info(model: Phi3ForCausalLM, stage: str, tokenizer_dir: Optional[str] = None,
             **extra) -> dict:
    return {"model": model.config.to_dict(), "stage": stage,
            "tokenizer_dir": tokenizer_dir or "", **extra}


def save_model(workdir: str, model: Phi3ForCausalLM, step: int, info: dict) -> None:
    """Save params + run_info at `step` and wait until it is on disk."""
    mngr = manager(workdir, async_save=False)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            run_info=ocp.args.JsonSave(info)))
    mngr.wait_until_finished()
    mngr.close()


def latest_step(workdir: str) -> Optional[int]:
    """The run's newest finalized checkpoint step, or None, read from the directory alone.

    No CheckpointManager here: creating one syncs every process (an all-gather over all
    devices), and whether this directory exists yet depends on how far another process's
    trainer has got. A process that saw it and opened a manager took part in one more
    collective than one that did not, and a 2-process RL run hung (process 1 waiting in
    CheckpointManager's all-gather that process 0 had already matched with this one).
    """
    root = checkpoint_dir(workdir)
    if not os.path.isdir(root):
        return None
    steps = ocp.path.step.checkpoint_steps(root)
    return max(steps) if steps else None


def restore_model(workdir: str, step: Optional[int] = None, mesh=None, rules=DEFAULT_RULES,
                  ) -> tuple[Phi3ForCausalLM, dict, int]:
    """(model, run_info, step) from the run's checkpoint `step` (default: the latest)."""
    ckpt_root = checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_root):
        raise FileNotFoundError(f"no checkpoints in run directory {workdir} "
                                f"(expected {ckpt_root})")
    mngr = manager(workdir)
    try:
        step = mngr.latest_step() if step is None or step < 0 else step
        if step is None:
            raise FileNotFoundError(f"run directory {workdir} has no checkpoint yet")
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt_root}; "
                                    f"available: {list(mngr.all_steps())}")
        info = mngr.restore(step, args=ocp.args.Composite(run_info=ocp.args.JsonRestore()))
        info = dict(info["run_info"])
        cfg = ModelConfig.from_dict(info["model"])
        layout = info.get("param_layout", "policy")
        graphdef, abstract = nnx.split(abstract_for_layout(cfg, layout))
        params_abstract = nnx.state(abstract, nnx.Param)
        pure = nnx.to_pure_dict(params_abstract)
        if mesh is not None:
            shardings = nnx.to_pure_dict(state_shardings(params_abstract, mesh, rules))
        else:
            single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: single, pure)
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_shardings(pure, shardings))))
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(params_abstract, restored["params"])
    policy_of = PARAM_LAYOUTS[layout][1]  # e.g. a PPO run: its policy without the critic
    return policy_of(nnx.merge(graphdef, params_abstract)), info, step


def with_shardings(tree, shardings):
    """Restore target: each abstract array of `tree` with the matching sharding."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
