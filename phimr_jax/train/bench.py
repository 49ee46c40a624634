"""Stage `bench`: benchmarks that print figures (never timed unit tests).

`sampler`: tokens/s of `phimr_jax.generate` against `transformers` `generate` on the same small
Phi3 model (same weights, batch, prompt and generation lengths), in one process, as a ratio.
Both greedy, neither stops early; our sampler is measured after its one compilation, HF after a
warm-up call. Requires torch (the `test` extra).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from phimr_jax.model.config import preset
from phimr_jax.model.hf_io import load_hf, save_hf
from phimr_jax.model.phi3 import init_model, param_count
from phimr_jax.model.sampling import generate

log = logging.getLogger(__name__)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_sampler(config: ConfigDict) -> dict:
    import torch
    import transformers

    b = config.sampler
    cfg = preset(b.model_preset, **dict(b.model_overrides))
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, size=(b.batch_size, b.prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        model = load_hf(tmp)  # the same weights, as a user would load them
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    torch.set_num_threads(os.cpu_count() or 1)
    ids = torch.tensor(prompts)

    def ours():
        generate(model, prompts, max_new_tokens=b.new_tokens, top_k=1, stop_tokens=[])

    def theirs():
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=b.new_tokens, min_new_tokens=b.new_tokens,
                        do_sample=False)

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    theirs()
    t_ours, t_hf = _time(ours, b.repeats), _time(theirs, b.repeats)
    tokens = b.batch_size * b.new_tokens
    out = {"bench": "sampler", "device": jax.devices()[0].device_kind,
           "model": b.model_preset, "params": param_count(cfg),
           "batch": b.batch_size, "prompt_len": b.prompt_len, "new_tokens": b.new_tokens,
           "ours_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_hf,
           "ratio": t_hf / t_ours, "ours_first_call_s": compile_s,
           "hf_ms_per_step": 1000 * t_hf / b.new_tokens}
    return out


BENCHES = {"sampler": bench_sampler}


def run(config: ConfigDict) -> dict:
    if config.bench not in BENCHES:
        raise ValueError(f"unknown bench {config.bench!r}; choose from {sorted(BENCHES)}")
    result = BENCHES[config.bench](config)
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                    for k, v in result.items()))
    if config.workdir:
        os.makedirs(config.workdir, exist_ok=True)
        with open(os.path.join(config.workdir, f"bench_{config.bench}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
