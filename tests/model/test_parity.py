"""Logits parity with transformers' Phi3ForCausalLM (torch, CPU, float32): max |diff| <= 1e-4."""

import numpy as np
import pytest

from phimr_jax import load_hf
from phimr_jax.model import config as mc
from tests.hf_reference import hf_logits, make_hf_model, random_factors

TOL = 1e-4


def _configs():
    rng = np.random.default_rng(1234)
    # (name, overrides): each a random tiny Phi3 with partial rotary 0.75, GQA and non-trivial
    # short and long factor lists; original context 64 so both regimes are cheap.
    specs = {
        "gqa2_hd16": dict(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96),
        "gqa3_hd16": dict(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160,
                          num_layers=3),
        "mqa_hd32_untied_window": dict(hidden_size=128, num_heads=4, num_kv_heads=1,
                                       intermediate_size=128, tie_word_embeddings=False,
                                       sliding_window=48),
    }
    out = []
    for name, over in specs.items():
        hd = over["hidden_size"] // over["num_heads"]
        n = int(hd * 0.75) // 2
        cfg = mc.tiny(short_factor=random_factors(rng, n, 2.0),
                      long_factor=random_factors(rng, n, 20.0), **over)
        out.append(pytest.param(cfg, id=name))
    return out


@pytest.fixture(params=_configs())
def hf_pair(request, tmp_path, torch_cpu):
    cfg = request.param
    hf = make_hf_model(cfg, seed=7)
    hf.save_pretrained(tmp_path)
    return cfg, hf, load_hf(str(tmp_path))


@pytest.mark.parametrize("seq_len", [40, 100])  # below / above original_max_position_embeddings
def test_logits_match_hf(hf_pair, seq_len):
    cfg, hf, model = hf_pair
    assert model.config.original_max_position_embeddings == 64
    ids = np.random.default_rng(seq_len).integers(0, cfg.vocab_size, size=(2, seq_len))
    want = hf_logits(hf, ids)
    got = np.asarray(model(ids))
    assert got.shape == (2, seq_len, cfg.vocab_size)
    assert want.std() > 0.5, "reference logits too small for a meaningful comparison"
    np.testing.assert_array_less(np.abs(got - want).max(), TOL)


def test_explicit_positions_match_hf(hf_pair):
    """Offset positions (as in a continued sequence) pick the regime from max(position)+1."""
    cfg, hf, model = hf_pair
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    for offset in (10, 50):  # max position 33 (short) and 73 (long)
        positions = np.broadcast_to(np.arange(24) + offset, (2, 24))
        want = hf_logits(hf, ids, positions)
        got = np.asarray(model(ids, positions=positions))
        np.testing.assert_array_less(np.abs(got - want).max(), TOL)


def test_plain_rope_config_matches_hf(tmp_path, torch_cpu):
    """rope_type default (e.g. Phi-3-mini-4k): no factors, no attention factor."""
    cfg = mc.tiny(rope_type="default", short_factor=None, long_factor=None,
                  partial_rotary_factor=1.0)
    hf = make_hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 80))
    np.testing.assert_array_less(np.abs(np.asarray(model(ids)) - hf_logits(hf, ids)).max(), TOL)


def test_long_and_short_regimes_differ(hf_pair):
    """Guard against a test that cannot fail: forcing the other regime changes the logits."""
    cfg, hf, model = hf_pair
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(1, 40))
    short = np.asarray(model(ids))
    forced_long = np.asarray(model(ids, long_rope=True))
    assert np.abs(short - forced_long).max() > 1e-2
