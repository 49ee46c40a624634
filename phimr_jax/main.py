"""Entry point: `python -m phimr_jax.main --config=configs/<stage>.py[:preset] [--config.x=y]`.

Parses flags, starts jax.distributed when asked, and dispatches on `config.stage`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# stage -> "module:function" (imported lazily so one stage's imports never slow another).
STAGES = {
    "convert": "phimr_jax.train.convert:run_convert",
    "export": "phimr_jax.train.convert:run_export",
    "init": "phimr_jax.train.convert:run_init",
    "midtrain": "phimr_jax.stages.midtrain:run",
    "sft": "phimr_jax.stages.sft:run",
    "generate": "phimr_jax.evaluation.generation:run",
    "bench": "phimr_jax.tools.bench:run",
    "bench_device": "phimr_jax.tools.bench_device:run",
    "eval": "phimr_jax.evaluation.harness:run",
    "curate": "phimr_jax.stages.curate:run",
    "dpo": "phimr_jax.stages.dpo:run",
    "rl": "phimr_jax.stages.rl.stage:run",
    "recipe": "phimr_jax.stages.recipe:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed (multi-host). Each of the three settings "
    "below comes from its flag, else its PHIMR_* environment variable, else JAX's auto-detection "
    "(TPU pods, SLURM, Open MPI). Only process 0 logs progress; the others log warnings.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (env PHIMR_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (env PHIMR_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (env PHIMR_PROCESS_ID).")

# Stages whose workdir is the run they write: with no --config.workdir they get
# runs/<preset>/<stage> (config_base.default_workdir). export reads its workdir; generate and
# bench only write there when one is given.
DEFAULT_WORKDIR_STAGES = ("convert", "init", "midtrain", "sft", "eval", "curate", "dpo", "rl",
                          "recipe")

# Errors that come from the user's input: printed as one line, exit code 2, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Orbax and JAX log every save/backend probe at INFO through absl; keep ours readable.
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<stage>.py[:preset] is required")
    stage = config.get("stage")
    if stage not in STAGES:
        raise app.UsageError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
    module, func = STAGES[stage].split(":")
    try:
        if _DISTRIBUTED.value:
            _init_distributed()
        _default_workdir(config, config_flags.get_config_filename(flags.FLAGS["config"]))
        getattr(importlib.import_module(module), func)(config)
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Errors that carry their own exit status (e.g. a NaN loss).
        if not hasattr(e, "exit_code"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _default_workdir(config, config_arg: str) -> None:
    """Give a run directory to a stage config that has none (relative to the current
    directory), and say which: the startup log names every stage's run directory."""
    from phimr_jax.train.config_base import default_workdir
    note = ""
    if not config.get("workdir") and config.stage in DEFAULT_WORKDIR_STAGES:
        config.workdir = default_workdir(config.stage, _preset(config_arg))
        note = " (the default; --config.workdir=DIR for another)"
    if config.get("workdir"):
        logging.getLogger(__name__).info("%s: run directory %s%s", config.stage,
                                         os.path.abspath(config.workdir), note)


def _preset(config_arg: str):
    """The preset of "configs/x.py:preset"; without one, get_config's default argument."""
    path, _, preset = config_arg.partition(":")
    if preset:
        return preset
    spec = importlib.util.spec_from_file_location("_phimr_preset_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    default = next(iter(inspect.signature(module.get_config).parameters.values())).default
    return None if default is inspect.Parameter.empty else default


def _setting(flag, env: str, cast=str):
    """A flag's value, else the environment variable's, else None (JAX auto-detects)."""
    if flag.value is not None:
        return flag.value
    value = os.environ.get(env, "").strip()
    try:
        return cast(value) if value else None
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a valid {cast.__name__}") from None


def _init_distributed() -> None:
    import jax
    settings = dict(coordinator_address=_setting(_COORDINATOR, "PHIMR_COORDINATOR_ADDRESS"),
                    num_processes=_setting(_NUM_PROCESSES, "PHIMR_NUM_PROCESSES", int),
                    process_id=_setting(_PROCESS_ID, "PHIMR_PROCESS_ID", int))
    try:
        jax.distributed.initialize(**settings)
    except ValueError as e:
        raise ValueError(f"--distributed: {e} Give --coordinator_address, --num_processes and "
                         "--process_id (or PHIMR_COORDINATOR_ADDRESS, PHIMR_NUM_PROCESSES, "
                         "PHIMR_PROCESS_ID) where JAX cannot detect the cluster.") from None
    if jax.process_index() != 0:  # One progress log per job: the others only warn.
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(__name__).info("jax.distributed: process %d of %d, %d of %d devices local",
                                     jax.process_index(), jax.process_count(),
                                     jax.local_device_count(), jax.device_count())


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
