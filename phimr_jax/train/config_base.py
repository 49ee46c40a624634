"""Fields every stage config shares (stage configs in configs/ start from `base_config`)."""

from __future__ import annotations

from ml_collections import ConfigDict

from phimr_jax.model.sharding import DEFAULT_RULES


def base_config(stage: str) -> ConfigDict:
    c = ConfigDict()
    c.stage = stage  # Which runner main.py dispatches to (see phimr_jax/main.py STAGES).
    c.workdir = ""  # Run directory: checkpoints/, metrics, tokenizer/ live here.
    c.seed = 0  # Seed of parameter init, data order and sampling.
    # Device mesh sizes per axis; one may be -1 for "all remaining devices".
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Logical axis name -> mesh axis (or list of axes, or None = replicated). One table for
    # parameters and activations; see phimr_jax/model/sharding.py.
    c.sharding_rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])]
                        for r in DEFAULT_RULES]
    return c
