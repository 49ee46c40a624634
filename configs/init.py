"""Create a freshly initialised model (sharded over the mesh) as a run's step-0 checkpoint.

  python -m phimr_jax.main --config=configs/init.py:demo --config.workdir=runs/demo/init
Presets: `demo` (the demo recipe's small Phi-architecture model), `phi4_mini` (3.8B, random
weights: for checking memory and sharding on a slice before real weights are converted).
"""

from phimr_jax.train.config_base import base_config


def get_config(arg="demo"):
    c = base_config("init")
    c.model_preset = arg or "demo"  # Architecture preset: demo | phi4_mini | tiny.
    c.dtype = "float32"  # Parameter dtype (float32 | bfloat16).
    c.step = 0  # Checkpoint step number to write.
    c.tokenizer_dir = ""  # Tokenizer the run will use, recorded for export ("" = none yet).
    return c
