"""Batch invariance of greedy generation under `rope_mode="hf"`: a row's tokens do not depend
on its batch companions or its left padding, and equal transformers' greedy generate on that
prompt alone, on random tiny Phi3 models whose rows cross original_max_position_embeddings
(64 here) at different steps, never, or from the start."""

import jax
import numpy as np
import pytest

from phimr_jax import load_hf
from phimr_jax.model import config as mc
from phimr_jax.model import sampling
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sampling import generate
from phimr_jax.model.sharding import make_mesh
from tests.hf_reference import make_hf_model, random_factors

NEW = 48
ORIG = 64
# Prompt lengths -> the step at which the row crosses (its length after feeding token t is
# P + t + 1 > 64 at t = 64 - P): 5 never (5 + 48 < 64), 20 at 44, 30 at 34, 40 at 24, 63 at 1,
# 64 at 0; 70 is past the boundary from its prompt on (long factors from the prefill).
LENGTHS = (5, 20, 30, 40, 63, 64, 70)


def crossing_step(prompt_len: int):
    """The step whose fed token takes the row past ORIG (None: never within NEW, or long
    from the prefill)."""
    t = ORIG - prompt_len
    return t if 0 <= t < NEW else None


def _configs():
    rng = np.random.default_rng(4321)
    # Untied LM heads: random tied models fall into repeating one token, which would make
    # the token comparisons weak.
    specs = {  # (architecture overrides, config.json spelling)
        "gqa2_legacy": (dict(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96),
                        "legacy"),
        "gqa3_3layers_v5": (dict(hidden_size=96, num_heads=6, num_kv_heads=2,
                                 intermediate_size=160, num_layers=3), "v5"),
        "mqa_window_legacy": (dict(hidden_size=64, num_heads=4, num_kv_heads=1,
                                   intermediate_size=128, sliding_window=48), "legacy"),
    }
    out = []
    for name, (over, spelling) in specs.items():
        n = int(over["hidden_size"] // over["num_heads"] * 0.75) // 2
        cfg = mc.tiny(short_factor=random_factors(rng, n, 2.0),
                      long_factor=random_factors(rng, n, 20.0), tie_word_embeddings=False,
                      **over)
        out.append(pytest.param((cfg, spelling), id=name))
    return out


@pytest.fixture(scope="module", params=_configs())
def pair(request, tmp_path_factory, torch_cpu):
    """(HF model, our model loaded from its save_pretrained directory, prompts)."""
    cfg, spelling = request.param
    hf = make_hf_model(cfg, seed=11, rope_format=spelling)
    with torch_cpu.no_grad():  # flatter logits, so the LongRoPE regime changes greedy choices
        hf.model.embed_tokens.weight.mul_(0.3)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = load_hf(str(path))
    assert ours.config.original_max_position_embeddings == ORIG
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, cfg.vocab_size, size=n).tolist() for n in LENGTHS]
    return hf, ours, prompts


def _hf_greedy(hf, prompt, stops=None):
    import torch

    kw = dict(eos_token_id=list(stops)) if stops else dict(min_new_tokens=NEW)
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                           **kw)[0, len(prompt):].tolist()


def test_batch_rows_equal_single_prompt_and_hf(pair):
    """Row i of generate(batch) == generate([prompt_i]) == HF greedy on prompt_i alone."""
    hf, ours, prompts = pair
    batch = generate(ours, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=[])
    for prompt, toks, lp in zip(prompts, batch.tokens, batch.logprobs):
        alone = generate(ours, [prompt], max_new_tokens=NEW, top_k=1, stop_tokens=[])
        assert toks == alone.tokens[0], len(prompt)
        np.testing.assert_allclose(lp, alone.logprobs[0], atol=1e-5)
        assert toks == _hf_greedy(hf, prompt), len(prompt)
    # Guard: a batch-wide regime (the longest row, already past 64, deciding) would run every
    # row with the long factors from the prefill on, as the fixed mode does here. The rows
    # that cross late or never then get other tokens.
    all_long = generate(ours, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=[],
                        rope_mode="fixed")
    for i, n in enumerate(LENGTHS):
        if n <= 40:
            assert all_long.tokens[i] != batch.tokens[i], n


def test_padding_invariance(pair):
    """The same prompt behind different amounts of left padding (companions of other
    lengths; prompt buckets 64, 128, 192) gives the same tokens and log-probs."""
    _, ours, prompts = pair
    rng = np.random.default_rng(3)
    mine = prompts[3]  # crosses at step 24
    runs = [generate(ours, [mine], max_new_tokens=NEW, top_k=1, stop_tokens=[])]
    for other in (3, 100, 130):
        companion = rng.integers(4, ours.config.vocab_size, size=other).tolist()
        runs.append(generate(ours, [companion, mine, companion[:5]], max_new_tokens=NEW,
                             top_k=1, stop_tokens=[]))
        assert runs[-1].tokens[1] == runs[0].tokens[0], other
        np.testing.assert_allclose(runs[-1].logprobs[1], runs[0].logprobs[0], atol=1e-5)


def _pick_stops(prompts, free):
    """Stop tokens from the free-running rows: one that first appears in the never-crossing
    row early (before the others cross), and for each crossing row one that first appears
    in it at or after its own crossing step."""
    stops = []
    for prompt, toks in zip(prompts, free):
        first = {}
        for j, tok in enumerate(toks):
            first.setdefault(tok, j)
        c = crossing_step(len(prompt))
        lo, hi = (0, 20) if c is None else (c, c + 6)
        cand = [tok for tok, j in first.items() if lo <= j < hi and tok not in stops]
        if cand:
            stops.append(min(cand, key=first.get))
    return stops


def test_stop_tokens_mixed_with_crossings(pair):
    """Rows stop before, at or after their own crossing step and before other rows cross;
    each row still equals its single-prompt run and HF's generate with the same stop ids."""
    hf, ours, prompts = pair
    free = generate(ours, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=[]).tokens
    stops = _pick_stops(prompts, free)
    res = generate(ours, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=stops)
    stopped_at = [len(t) - 1 if r == "stop" else None
                  for t, r in zip(res.tokens, res.finish_reasons)]
    crossings = [crossing_step(len(p)) for p in prompts]
    # The batch really mixes the cases: a row stops after (or at) its own crossing, and a
    # row stops while another row has yet to cross.
    assert any(s is not None and c is not None and s >= c for s, c in zip(stopped_at, crossings))
    assert any(s is not None and any(c is not None and c > s for c in crossings)
               for s in stopped_at)
    assert "length" in res.finish_reasons or len(set(stopped_at)) > 2
    for prompt, toks, lp in zip(prompts, res.tokens, res.logprobs):
        alone = generate(ours, [prompt], max_new_tokens=NEW, top_k=1, stop_tokens=stops)
        assert toks == alone.tokens[0], len(prompt)
        np.testing.assert_allclose(lp, alone.logprobs[0], atol=1e-5)
        assert toks == _hf_greedy(hf, prompt, stops), len(prompt)


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(mc.tiny(initializer_range=0.125), seed=9)  # original context 64


def test_no_recompilation_across_crossing_patterns(tiny_model):
    """Same buckets, different crossing steps (or none): one compiled program."""
    rng = np.random.default_rng(0)
    run = lambda lengths: generate(tiny_model, [rng.integers(4, 512, size=n).tolist()
                                                for n in lengths], max_new_tokens=NEW, top_k=1)
    run((5,))
    before = sampling._sample._cache_size()
    for lengths in ((40,), (64, 3), (20, 30, 40, 50), (63, 63, 63)):
        run(lengths)
    assert sampling._sample._cache_size() == before


def test_sharded_simultaneous_crossings_equal_single_device(tiny_model):
    """Under a mesh the crossing rows are re-encoded one per batch shard (4 here); six rows
    crossing at the same step take two rounds, the others cross alone. Same tokens as the
    unsharded sampler (one row per round) and as each prompt alone."""
    cfg = tiny_model.config
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = init_model(cfg, seed=9, mesh=mesh)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (40,) * 6 + (10, 55, 66, 30)]
    assert sampling._batch_shards(16) == 1
    with jax.set_mesh(mesh):
        assert sampling._batch_shards(16) == 4
        got = generate(sharded, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=[])
    want = generate(tiny_model, prompts, max_new_tokens=NEW, top_k=1, stop_tokens=[])
    assert got.tokens == want.tokens
    for i in (0, 5, 7, 8):
        alone = generate(tiny_model, [prompts[i]], max_new_tokens=NEW, top_k=1, stop_tokens=[])
        assert want.tokens[i] == alone.tokens[0]
