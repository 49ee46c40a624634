"""Export a run's Orbax checkpoint to an HF directory loadable by transformers.

  python -m phimr_jax.main --config=configs/export.py --config.workdir=RUN --config.out_dir=HF_OUT
"""

from phimr_jax.train.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config("export")
    c.out_dir = ""  # HF directory to write (config.json, generation_config.json, safetensors).
    c.step = -1  # Checkpoint step to export; -1 = the latest.
    c.dtype = ""  # dtype of the written tensors; "" = the checkpoint's parameter dtype.
    c.max_shard_size_mb = 5120  # Split into model-0000x-of-0000y files above this size.
    c.rope_format = "auto"  # config.json RoPE spelling: auto | legacy (rope_scaling) | v5.
    c.tokenizer_dir = ""  # Tokenizer files to copy; "" = the run's own (if it knows them).
    return c
