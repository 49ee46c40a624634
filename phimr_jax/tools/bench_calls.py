"""Bench `sampler_calls`: the demo recipe's sampling as it runs, rollout-shaped calls of
`generate_in_calls` (demo model, `auto` compute dtype, calls of 32 prompts x 8 samples = 256
rows), one call at a time against two at once (`sampling_calls.sampler_workers`), in one
process, alternating, the best of `repeats` each. Random weights and no stop tokens, so every
row decodes `new_tokens` steps; it reports whether both ways gave the same tokens and
log-probs (they must, to the bit)."""

from __future__ import annotations

import time

import jax
import numpy as np
from ml_collections import ConfigDict

from phimr_jax.model.config import preset
from phimr_jax.model.dtypes import resolve_compute_dtype
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sampling_calls import generate_in_calls


def bench_sampler_calls(config: ConfigDict) -> dict:
    b = config.sampler_calls
    cfg = preset(b.model_preset, dtype=resolve_compute_dtype(b.dtype))
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg.vocab_size, size=int(n)).tolist()
               for n in rng.integers(b.min_prompt_len, b.max_prompt_len + 1, b.prompts)]

    def sample(workers):
        return generate_in_calls(model, prompts, prompts_per_call=b.prompts_per_call, seed=0,
                                 num_samples=b.samples, max_new_tokens=b.new_tokens,
                                 temperature=1.0, stop_tokens=[], rope_mode="fixed",
                                 fixed_length=b.max_prompt_len + b.new_tokens, workers=workers)

    start = time.perf_counter()
    sample(1)
    compile_s = time.perf_counter() - start
    best = {1: float("inf"), 2: float("inf")}
    results = {}
    for _ in range(b.repeats):
        for workers in (1, 2):
            start = time.perf_counter()
            results[workers] = sample(workers)
            best[workers] = min(best[workers], time.perf_counter() - start)
    one, two = results[1], results[2]
    same = one.tokens == two.tokens and all(
        np.array_equal(x, y) for x, y in zip(one.logprobs + one.sampling_logprobs,
                                             two.logprobs + two.sampling_logprobs))
    tokens = b.prompts * b.samples * b.new_tokens
    return {"bench": "sampler_calls", "device": jax.devices()[0].device_kind,
            "model": b.model_preset, "dtype": cfg.dtype, "rows": b.prompts * b.samples,
            "rows_per_call": b.prompts_per_call * b.samples, "new_tokens": b.new_tokens,
            "first_call_s": compile_s, "one_at_a_time_s": best[1], "two_at_once_s": best[2],
            "one_at_a_time_tokens_per_s": tokens / best[1],
            "two_at_once_tokens_per_s": tokens / best[2], "speedup": best[1] / best[2],
            "same_tokens_and_logprobs": bool(same)}
