"""The sampler: greedy == HF generate and full-forward argmax, LongRoPE crossing, fixed-regime
log-probs == trainer log-probs, sampling distributions, no recompilation, sharding."""

import jax
import numpy as np
import pytest

from phimr_jax import load_hf
from phimr_jax.model import config as mc
from phimr_jax.model import sampling
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sampling import generate, rope_regime
from phimr_jax.model.sharding import make_mesh
from tests.hf_reference import make_hf_model


@jax.jit
def _forward(model, ids):
    return model(ids)


def _reference(model, prompt, n, stops, width=128):
    """Step-by-step argmax of the full forward. Causal attention: logits at position len-1 of
    a right-padded row ignore the padding, and HF's regime rule (max position + 1) is applied
    by forcing it, so one compiled width serves every step."""
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


@pytest.fixture(scope="module")
def model():
    # original context 256 > any test length here: the regime stays short throughout.
    return init_model(mc.tiny(initializer_range=0.125, original_max_position_embeddings=256),
                      seed=3)


def test_greedy_matches_full_forward_argmax_with_ragged_prompts(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (5, 17, 9)]
    res = generate(model, prompts, max_new_tokens=24, top_k=1, stop_tokens=(3,))
    for prompt, toks, length, reason in zip(prompts, res.tokens, res.lengths, res.finish_reasons):
        want = _reference(model, prompt, 24, (3,))
        assert toks == want and length == len(want)
        assert reason == ("stop" if want[-1] == 3 else "length")


def test_stops_per_row_and_reports_reasons(model):
    prompt = [5, 6, 7, 8]
    free = generate(model, [prompt], max_new_tokens=12, top_k=1, stop_tokens=[]).tokens[0]
    assert len(free) == 12
    stop = free[4]
    res = generate(model, [prompt, [9, 10]], max_new_tokens=12, top_k=1, stop_tokens=[stop])
    assert res.tokens[0] == free[:free.index(stop) + 1] and res.finish_reasons[0] == "stop"
    assert res.lengths[0] == len(res.tokens[0]) and len(res.logprobs[0]) == res.lengths[0]


@pytest.mark.parametrize("orig,prompt_len", [(256, 30), (64, 40)])  # no crossing / crossing
def test_greedy_token_identical_to_hf_generate(tmp_path, torch_cpu, orig, prompt_len,
                                               monkeypatch):
    """>= 64 new tokens; with original context 64 the sequence crosses it mid-generation and
    HF drops its cache there: the default rope_mode must do exactly the same."""
    import torch

    cfg = mc.tiny(original_max_position_embeddings=orig)
    hf = make_hf_model(cfg, seed=5)
    with torch.no_grad():  # flatter logits, so the LongRoPE regime changes greedy choices
        hf.model.embed_tokens.weight.mul_(0.3)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp_path)
    ours = load_hf(str(tmp_path))
    rng = np.random.default_rng(orig)
    for _ in range(2):
        prompt = rng.integers(4, cfg.vocab_size, size=prompt_len).tolist()
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                               min_new_tokens=64)[0, prompt_len:].tolist()
        got = generate(ours, [prompt], max_new_tokens=64, top_k=1, stop_tokens=[]).tokens[0]
        assert got == want
        if orig == 64:
            # Sensitivity: long factors throughout, or short factors throughout (no re-encode
            # at the crossing), both give other tokens than HF.
            always_long = generate(ours, [prompt], max_new_tokens=64, top_k=1, stop_tokens=[],
                                   rope_mode="fixed").tokens[0]
            monkeypatch.setattr(sampling, "rope_regime", lambda *_: False)
            always_short = generate(ours, [prompt], max_new_tokens=64, top_k=1, stop_tokens=[],
                                    rope_mode="fixed").tokens[0]
            monkeypatch.undo()
            assert always_long != want and always_short != want
            first = next(i for i, (a, b) in enumerate(zip(always_short, want)) if a != b)
            assert first >= orig - prompt_len  # they part only after the crossing


def test_fixed_regime_logprobs_equal_trainer_logprobs():
    """rope_mode='fixed': the sampler's model log-probs are what a trainer computes on the
    finished sequences with the same regime (importance ratio 1 at the first RL step)."""
    m = init_model(mc.tiny(initializer_range=0.125), seed=4)  # original context 64
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (30, 45)]
    res = generate(m, prompts, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=2,
                   stop_tokens=[], rope_mode="fixed")
    long = rope_regime(m.config, 45 + 40)
    assert long
    for prompt, toks, lp in zip(prompts, res.tokens, res.logprobs):
        seq = np.array([prompt + toks])
        logp = jax.nn.log_softmax(np.asarray(m(seq, long_rope=long))[0], axis=-1)
        ref = logp[np.arange(len(prompt) - 1, seq.shape[1] - 1), seq[0, len(prompt):]]
        np.testing.assert_allclose(lp, ref, atol=1e-4)


def _last_logits(m, prompt):
    return np.asarray(m(np.array([prompt])))[0, -1].astype(np.float64)


@pytest.fixture(scope="module")
def small_vocab():
    return init_model(mc.tiny(vocab_size=16, initializer_range=0.3), seed=0)


def _freqs(m, prompt, n, **kw):
    res = generate(m, [prompt], max_new_tokens=1, num_samples=n, stop_tokens=[], **kw)
    toks = np.array([t[0] for t in res.tokens])
    return np.bincount(toks, minlength=16) / n, res


def _check(freq, p, n):
    sigma = np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-3), (freq, p)


def test_temperature_sampling_matches_softmax(small_vocab):
    prompt, n = [1, 2, 3], 6000
    logits = _last_logits(small_vocab, prompt)
    for temp in (1.0, 0.6):
        p = np.exp((logits - logits.max()) / temp)
        p /= p.sum()
        freq, res = _freqs(small_vocab, prompt, n, temperature=temp, seed=int(temp * 10))
        _check(freq, p, n)
        toks = np.array([t[0] for t in res.tokens])
        np.testing.assert_allclose(np.array([s[0] for s in res.sampling_logprobs]),
                                   np.log(p[toks]), atol=1e-4)


def test_top_k_and_top_p_mass(small_vocab):
    prompt, n = [4, 5], 6000
    logits = _last_logits(small_vocab, prompt)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    # top-k = 3: only the three most likely tokens, renormalised.
    keep = np.zeros(16, bool)
    keep[order[:3]] = True
    freq, _ = _freqs(small_vocab, prompt, n, top_k=3, seed=1)
    assert freq[~keep].sum() == 0
    _check(freq, np.where(keep, p, 0) / p[keep].sum(), n)
    # top-p = 0.7: the smallest most-likely set whose mass reaches 0.7.
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros(16, bool)
    keep[order[before < 0.7]] = True
    assert 1 < keep.sum() < 16
    freq, _ = _freqs(small_vocab, prompt, n, top_p=0.7, seed=2)
    assert freq[~keep].sum() == 0
    _check(freq, np.where(keep, p, 0) / p[keep].sum(), n)


def _nucleus_reference(logits, temperature, top_p, top_k):
    """The definition, in float64 numpy: sort descending, keep an entry while the mass strictly
    above it is < top_p and it is among the first top_k; ties with the last kept value stay."""
    x = logits.astype(np.float64) / temperature
    out = np.full(x.shape, sampling._NEG, np.float32)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        p = np.exp(row - row.max())
        p = p[order] / p.sum()
        before = np.cumsum(p) - p
        keep = (before < top_p) & (np.arange(len(row)) < (top_k if top_k > 0 else len(row)))
        cut = row[order][keep].min()
        out[r] = np.where(row >= cut, logits[r] / np.float32(temperature), sampling._NEG)
    return out


@pytest.mark.parametrize("vocab", [16, 1024])
def test_nucleus_filter_candidates_and_whole_vocab_agree_with_the_definition(vocab):
    """The filter looks at the 32 most likely tokens first and sorts the whole vocab only when
    they hold less than top_p of a row's mass: peaked rows (the candidates settle it), flat rows
    (the whole-vocab sort), ties, top-k above and below the candidate count, a batch mixing
    both kinds of row. Every case must keep exactly the definition's tokens."""
    rng = np.random.default_rng(vocab)
    filt = jax.jit(sampling._filter_logits)
    peaked = rng.standard_normal((8, vocab)).astype(np.float32) * 6
    flat = rng.standard_normal((8, vocab)).astype(np.float32) * 0.3
    ties = np.round(rng.standard_normal((8, vocab)) * 2).astype(np.float32)
    mixed = np.concatenate([peaked[:4], flat[:4]])
    n_sorted = 0
    for rows in (peaked, flat, ties, mixed):
        for temperature, top_p, top_k in ((0.6, 0.95, 0), (1.0, 0.5, 0), (1.0, 1.0, 5),
                                          (0.8, 0.9, 40), (1.0, 0.99, 0)):
            got = np.asarray(filt(rows, np.float32(temperature), np.float32(top_p),
                                  np.int32(top_k), np.bool_(False)))
            want = _nucleus_reference(rows, temperature, top_p, top_k)
            np.testing.assert_array_equal(got > sampling._NEG, want > sampling._NEG)
            np.testing.assert_allclose(got[got > sampling._NEG], want[want > sampling._NEG],
                                       rtol=1e-6)
            x = rows.astype(np.float64) / temperature
            p = np.exp(x - x.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            top = -np.sort(-p, -1)[:, :32].sum(-1)
            n_sorted += bool(np.any((top < top_p) & ((top_k <= 0) | (top_k > 32))))
    # Both paths ran: with 1024 tokens the flat rows need the whole-vocab sort.
    assert (n_sorted > 0) == (vocab > 32)


def test_sampling_parameters_never_recompile(small_vocab):
    generate(small_vocab, [[1, 2]], max_new_tokens=8, temperature=1.0, seed=0)
    before = sampling._sample._cache_size()
    for temp, top_p, top_k in ((0.9, 1.0, 0), (0.6, 0.95, 0), (0.7, 0.5, 5), (1.0, 1.0, 1)):
        generate(small_vocab, [[1, 2]], max_new_tokens=8, temperature=temp, top_p=top_p,
                 top_k=top_k, seed=3)
    assert sampling._sample._cache_size() == before


def test_num_samples_order_and_seed(small_vocab):
    res = generate(small_vocab, [[1, 2], [3]], max_new_tokens=6, num_samples=3, seed=7,
                   stop_tokens=[])
    again = generate(small_vocab, [[1, 2], [3]], max_new_tokens=6, num_samples=3, seed=7,
                     stop_tokens=[])
    assert len(res.tokens) == 6 and res.tokens == again.tokens
    assert len({tuple(t) for t in res.tokens[:3]}) > 1  # samples of one prompt differ


def test_sharded_generation_equals_single_device():
    cfg = mc.tiny(initializer_range=0.125)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = init_model(cfg, seed=6, mesh=mesh)
    plain = init_model(cfg, seed=6)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    with jax.set_mesh(mesh):
        got = generate(sharded, prompts, max_new_tokens=16, top_k=1, stop_tokens=[])
    want = generate(plain, prompts, max_new_tokens=16, top_k=1, stop_tokens=[])
    assert got.tokens == want.tokens


def test_vocab_limit_is_never_sampled_but_model_logprobs_cover_all(small_vocab):
    """Padded embedding rows (ids >= the tokenizer's size) are never drawn, greedy included."""
    logits = _last_logits(small_vocab, [1, 2, 3])
    top = int(np.argmax(logits))
    res = generate(small_vocab, [[1, 2, 3]], max_new_tokens=1, num_samples=2000, stop_tokens=[],
                   vocab_limit=top, seed=0)  # the most likely id and all above are excluded
    toks = np.array([t[0] for t in res.tokens])
    assert toks.max() < top and len(set(toks.tolist())) > 1
    greedy = generate(small_vocab, [[1, 2, 3]], max_new_tokens=1, top_k=1, vocab_limit=top,
                      stop_tokens=[])
    assert greedy.tokens[0][0] == int(np.argmax(logits[:top]))
    lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert greedy.logprobs[0][0] == pytest.approx(lp[greedy.tokens[0][0]], abs=1e-4)


def test_kv_cache_is_sharded_by_the_rules():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    m = init_model(mc.tiny(), seed=0, mesh=mesh)
    with jax.set_mesh(mesh):
        cache = jax.jit(lambda model: model.init_cache(8, 16))(m)
    assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None,
                                                                "tensor")
    assert cache.k.addressable_shards[0].data.shape == (2, 2, 16, 1, 16)


def test_pick_draws_from_the_sampling_distribution():
    """_pick's inverse-CDF draw (one uniform per row): over 40000 rows of the same logits the
    token frequencies are softmax(logits / T) within 5 standard errors, tokens at or above
    vocab_limit and tokens top-k removed are never drawn, and the returned sampling
    log-prob is that of the drawn token."""
    import jax.numpy as jnp
    row = jax.random.normal(jax.random.key(0), (50,)) * 1.5
    row = row.at[7].set(row[3])  # exact ties
    logits = jnp.broadcast_to(row, (40000, 50))
    for t, top_k, limit, seed in ((1.0, 0, 50, 1), (0.6, 0, 40, 2), (1.0, 10, 50, 3)):
        tok, _, samp_lp = sampling._pick(logits, jax.random.key(seed), jnp.float32(t),
                                         jnp.float32(1.0), jnp.int32(top_k), jnp.int32(limit))
        x = np.asarray(row, np.float64) / t
        x[limit:] = -np.inf
        if top_k:
            x[np.argsort(-x)[top_k:]] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        tok = np.asarray(tok)
        freq = np.bincount(tok, minlength=50) / len(tok)
        assert freq[p == 0].sum() == 0
        se = np.sqrt(p * (1 - p) / len(tok)) + 1e-12
        assert np.all(np.abs(freq - p) <= 5 * se + 1e-4), np.abs(freq - p).max()
        np.testing.assert_allclose(np.asarray(samp_lp), np.log(p[tok]), atol=1e-4)


def test_cpu_bf16_model_samples_the_same_with_a_float32_cache(monkeypatch):
    """On CPU a bfloat16 model's sampler keeps its KV cache in float32 (sampling.cache_dtype):
    the cache holds the same bfloat16 values, so tokens and log-probs equal those of a
    bfloat16 cache."""
    import jax.numpy as jnp
    m = init_model(mc.tiny(initializer_range=0.125, dtype="bfloat16"), seed=5)
    assert sampling.cache_dtype(m.config) == jnp.float32
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (12, 20, 7)]
    kw = dict(max_new_tokens=24, temperature=0.8, seed=4, stop_tokens=[], num_samples=2)
    ours = generate(m, prompts, **kw)
    monkeypatch.setattr(sampling, "cache_dtype", lambda config: config.jnp_dtype)
    sampling._sample.clear_cache()  # retrace with the bfloat16 cache
    plain = generate(m, prompts, **kw)
    sampling._sample.clear_cache()
    assert ours.tokens == plain.tokens
    np.testing.assert_allclose(np.array(ours.logprobs), np.array(plain.logprobs), atol=1e-6)
