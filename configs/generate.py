"""Sample completions for a JSONL of questions with the in-JAX sampler.

  python -m phimr_jax.main --config=configs/generate.py --config.hf_dir=DIR \
      --config.prompts=questions.jsonl --config.output=completions.jsonl
  (or --config.checkpoint=RUN_DIR to sample from a training run's latest checkpoint)
"""

from phimr_jax.evaluation.inference import sampling_config
from phimr_jax.train.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config("generate")
    c.update(sampling_config())
    c.prompts = ""  # JSONL file(s) with one question per line.
    c.prompt_field = "problem"  # Field holding the question text.
    c.output = ""  # Output JSONL ("" = workdir/completions.jsonl).
    return c
