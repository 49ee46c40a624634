"""Greedy decoding on the KV cache equals step-by-step argmax of the full forward pass."""

import jax
import numpy as np

from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sampling import greedy_generate


@jax.jit
def _forward(model, ids):
    return model(ids)


def _reference(model, prompt, n, stops, width=64):
    """Causal attention: logits at position len-1 of a right-padded row ignore the padding, so
    one compiled width serves every step."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, :len(seq)] = seq
        tok = int(np.asarray(_forward(model, row))[0, len(seq) - 1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stops:
            break
    return out


def test_greedy_matches_full_forward_argmax_with_ragged_prompts():
    model = init_model(mc.tiny(initializer_range=0.125), seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (5, 17, 9)]
    got = greedy_generate(model, prompts, max_new_tokens=24, stop_ids=(3,))
    for prompt, completion in zip(prompts, got):
        assert completion == _reference(model, prompt, 24, (3,))
        assert len(completion) >= 1


def test_greedy_stops_at_stop_token():
    model = init_model(mc.tiny(initializer_range=0.125), seed=3)
    prompt = [5, 6, 7, 8]
    free = greedy_generate(model, [prompt], max_new_tokens=12, stop_ids=(-1,))[0]
    stop = free[4]  # make the 5th generated token a stop token
    got = greedy_generate(model, [prompt], max_new_tokens=12, stop_ids=(stop,))[0]
    assert got == free[:free.index(stop) + 1]
