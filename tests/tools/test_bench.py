"""Smoke runs of the benchmarks at toy sizes: they run, write JSON, report sane fields.
(The figures themselves are in BENCHMARKS.md; nothing here asserts a speed.)"""

import json

import numpy as np

import pytest

from phimr_jax.tools import bench
from tests.test_configs import load

TOY = {"num_layers": 1, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
       "intermediate_size": 128, "vocab_size": 256, "short_factor": [1.0] * 6,
       "long_factor": [1.0] * 6}


def _config(name, workdir):
    c = load("bench", name)
    c.workdir = str(workdir)
    for sub in ("sampler", "forward", "train_step"):
        c[sub].model_overrides = TOY
    c.sampler.update(batch_size=2, prompt_len=4, new_tokens=4, repeats=1)
    c.forward.update(batch_size=2, seq_len=16, repeats=1)
    c.train_step.update(batch_size=2, seq_len=32, chunk_size=16, steps=2, matmul_size=128)
    return c


def test_forward_bench_matches_hf(tmp_path, torch_cpu):
    out = bench.run(_config("forward", tmp_path))
    for impl in ("xla", "blockwise"):
        assert out[f"{impl}_tokens_per_s"] > 0 and out[f"{impl}_max_abs_logit_diff"] < 1e-4
    assert json.loads((tmp_path / "bench_forward.json").read_text())["bench"] == "forward"


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_train_step_bench(tmp_path, impl):
    c = _config("train_step", tmp_path)
    c.train_step.attention_impl = impl
    out = bench.run(c)
    assert out["attention_impl"] == impl and out["tokens_per_s"] > 0
    assert 0 < out["mfu"] and out["model_tflop_per_s"] > 0 and out["compile_s"] > 0
    # 6 N T + causal attention, by hand for the toy model (1 layer, head_dim 16).
    n = 1 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 256 * 64
    pairs = 2 * 32 * 33 // 2
    assert out["model_tflops_per_step"] * 1e12 == pytest.approx(
        6 * n * 64 + 12 * 4 * 16 * pairs)
    assert 0.5 < out["estimated_memory_mib"] / out["peak_memory_mib"] < 2


def test_sampler_bench_nucleus_sampling_on_both_sides(tmp_path, torch_cpu, monkeypatch):
    """--config.sampler.temperature / top_p: both samplers draw with them (HF with
    do_sample, its own top-k off); the default stays greedy on both."""
    import transformers

    seen = []
    original = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "top_k")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    c = _config("sampler", tmp_path)
    c.sampler.update(temperature=0.6, top_p=0.95, hf_threads="1")
    out = bench.run(c)
    assert out["temperature"] == 0.6 and out["top_p"] == 0.95 and out["ratio"] > 0
    assert seen and all(k == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0}
                        for k in seen)
    seen.clear()
    out = bench.run(_config("sampler", tmp_path))
    assert out["temperature"] == 0.0 and seen and all(k["do_sample"] is False for k in seen)


def test_all_writes_every_result(tmp_path, torch_cpu):
    out = bench.run(_config("all", tmp_path))
    assert set(out) == {"sampler", "forward", "train_step"}
    for name in ("sampler", "forward", "train_step", "all"):
        assert (tmp_path / f"bench_{name}.json").exists()


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 1), (0.0, 0.95, 0), (0.0, 1.0, 5),
                                                     (1.0, 1.0, 1)])
def test_greedy_pick_without_the_vocab_sort_is_unchanged(temperature, top_p, top_k):
    """The sampler speed-up the sampler bench measures: greedy steps skip the top-k/top-p sort
    (sampling._filter_logits). Tokens and both log-probs are what greedy always returned:
    the argmax of the allowed ids, its model log-prob, and a sampling log-prob of 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from phimr_jax.model import sampling

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 300)) * 3, jnp.float32)
    token, model_lp, samp_lp = sampling._pick(logits, jax.random.key(1), jnp.float32(temperature),
                                              jnp.float32(top_p), jnp.int32(top_k), 280)
    want = np.asarray(logits)[:, :280].argmax(-1)
    np.testing.assert_array_equal(np.asarray(token), want)
    np.testing.assert_array_equal(
        np.asarray(model_lp), np.asarray(jax.nn.log_softmax(logits))[np.arange(6), want])
    np.testing.assert_array_equal(np.asarray(samp_lp), 0.0)


def test_matmul_shapes_cover_the_model_flops():
    """The matmuls timed as the forward+backward floor are the model's: their FLOPs equal
    6 N T plus unmasked attention (3 passes x 2 matmuls x 2 x B x heads x head_dim x T^2 x L)."""
    from phimr_jax.model.config import preset

    cfg = preset("demo")
    b, t = 3, 40
    n_matmul, _ = bench.model_flops_per_token_pair(cfg)
    flops = sum(2 * m * k * n * int(np.prod(bd)) for bd, m, k, n in bench.matmul_shapes(cfg, b, t))
    attention = 12 * b * cfg.num_heads * cfg.resolved_head_dim * t * t * cfg.num_layers
    assert flops == 6 * n_matmul * b * t + attention


def test_train_step_bench_reports_the_matmul_floor(tmp_path):
    out = bench.run(_config("train_step", tmp_path))
    assert out["summed_matmul_s"] > 0 and out["fwd_bwd_s"] > 0
    assert out["fwd_bwd_over_matmuls"] == pytest.approx(out["fwd_bwd_s"] / out["summed_matmul_s"])


def test_sampler_calls_bench_compares_one_and_two_calls_at_once(tmp_path):
    """The demo's sampler calls one at a time vs two at once: both timed, same rows."""
    c = load("bench", "sampler_calls")
    c.workdir = str(tmp_path)
    c.sampler_calls.update(prompts=6, prompts_per_call=2, samples=2, new_tokens=4, repeats=1,
                           min_prompt_len=3, max_prompt_len=9)
    out = bench.run(c)
    assert out["same_tokens_and_logprobs"] and out["rows"] == 12 and out["rows_per_call"] == 4
    assert out["one_at_a_time_s"] > 0 and out["two_at_once_s"] > 0 and out["speedup"] > 0
    assert json.load(open(tmp_path / "bench_sampler_calls.json"))["rows"] == 12
