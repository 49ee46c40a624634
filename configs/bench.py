"""Benchmarks that print their figures (and write workdir/bench_<name>.json if workdir is set).

  python -m phimr_jax.main --config=configs/bench.py:sampler
"""

from ml_collections import ConfigDict

from phimr_jax.train.config_base import base_config


def get_config(arg="sampler"):
    c = base_config("bench")
    c.bench = arg or "sampler"  # Which benchmark: sampler.
    c.sampler = ConfigDict()
    c.sampler.model_preset = "tiny"  # Small Phi3 architecture, on this CPU machine.
    # 4 layers, hidden 256, GQA 8/4: the "4-layer model at batch 8" of the perf targets.
    c.sampler.model_overrides = ConfigDict({"num_layers": 4, "hidden_size": 256, "num_heads": 8,
                                            "num_kv_heads": 4, "intermediate_size": 512,
                                            "vocab_size": 2048, "short_factor": [1.0] * 12,
                                            "long_factor": [1.0] * 12})
    c.sampler.batch_size = 8  # Rows generated at once.
    c.sampler.prompt_len = 32  # Prompt tokens per row.
    c.sampler.new_tokens = 128  # Generated tokens per row (no early stop).
    c.sampler.repeats = 3  # Timed repetitions; the best is reported.
    return c
