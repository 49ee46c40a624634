"""Convert an HF Phi3 checkpoint directory to an Orbax checkpoint of a run.

  python -m phimr_jax.main --config=configs/convert.py --config.hf_dir=IN --config.workdir=OUT
"""

from phimr_jax.train.config_base import base_config


def get_config(arg=None):
    del arg  # No presets: the HF directory defines the model.
    c = base_config("convert")
    c.hf_dir = ""  # HF directory: config.json + model.safetensors (or sharded + index).
    c.dtype = "float32"  # Parameter dtype of the converted weights (float32 | bfloat16).
    c.step = 0  # Checkpoint step number to write.
    c.tokenizer_dir = ""  # Tokenizer files to carry along; "" = those found in hf_dir.
    return c
