"""Entry point: `python -m phimr_jax.main --config=configs/<stage>.py[:preset] [--config.x=y]`.

Parses flags, starts jax.distributed when asked, and dispatches on `config.stage`.
"""

from __future__ import annotations

import importlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

# stage -> "module:function" (imported lazily so one stage's imports never slow another).
STAGES = {
    "convert": "phimr_jax.train.convert:run_convert",
    "export": "phimr_jax.train.convert:run_export",
    "init": "phimr_jax.train.convert:run_init",
    "midtrain": "phimr_jax.train.midtrain:run",
    "sft": "phimr_jax.train.sft:run",
    "generate": "phimr_jax.train.generation:run",
    "bench": "phimr_jax.train.bench:run",
    "eval": "phimr_jax.train.evaluation:run",
    "curate": "phimr_jax.train.curate:run",
    "dpo": "phimr_jax.train.dpo:run",
    "recipe": "phimr_jax.train.recipe:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed (multi-host). On TPU pods the coordinator "
    "is auto-detected; elsewhere give --coordinator_address, --num_processes, --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

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
    if _DISTRIBUTED.value:
        import jax
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    stage = config.get("stage")
    if stage not in STAGES:
        raise app.UsageError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
    module, func = STAGES[stage].split(":")
    try:
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


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
