"""Many prompts through the sampler (`sampling_calls`): calls in order of prompt length, one
LongRoPE regime over all of them, and on a CPU two calls at once with the same rows as one at a
time."""

import threading
import time

import jax
import numpy as np
import pytest

from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sampling import generate, rope_regime
from phimr_jax.model.sampling_calls import generate_in_calls, in_order, sampler_workers


def test_calls_by_prompt_length_share_one_fixed_regime_and_keep_prompt_order():
    """generate_in_calls (RL's rollouts): calls of 1 prompt formed in order of prompt length,
    rows back in the prompts' order, and with `fixed_length` every call samples in the regime
    of the whole batch: a 20-token prompt alone (20 + 24 <= 64) would take the short one, but
    in a batch with a 45-token prompt both score as the trainer scores them with long
    factors."""
    m = init_model(mc.tiny(initializer_range=0.125), seed=4)  # original context 64
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 512, size=n).tolist() for n in (45, 20)]
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, stop_tokens=[], rope_mode="fixed")
    done = []
    res = generate_in_calls(m, prompts, prompts_per_call=1, seed=7, num_samples=2,
                            fixed_length=45 + 24, on_call=done.append, **kw)
    assert done == [1, 2] and len(res.tokens) == 4
    # Call 0 is the shorter prompt (seed 7 + 0), call 1 the longer (seed 7 + 1).
    alone = generate(m, [prompts[1]], num_samples=2, seed=7, fixed_length=45 + 24, **kw)
    assert res.tokens[2:] == alone.tokens
    assert rope_regime(m.config, 45 + 24) and not rope_regime(m.config, 20 + 24)
    for i, (toks, lp) in enumerate(zip(res.tokens, res.logprobs)):
        prompt = prompts[i // 2]
        seq = np.array([prompt + toks])
        logp = jax.nn.log_softmax(np.asarray(m(seq, long_rope=True))[0], axis=-1)
        ref = logp[np.arange(len(prompt) - 1, seq.shape[1] - 1), seq[0, len(prompt):]]
        np.testing.assert_allclose(lp, ref, atol=1e-4)
    # Guard: the short prompt's rows scored in its own (short) regime differ, so the check
    # above would catch a call that chose its regime alone.
    seq = np.array([prompts[1] + res.tokens[2]])
    logp = jax.nn.log_softmax(np.asarray(m(seq, long_rope=False))[0], axis=-1)
    short = logp[np.arange(19, seq.shape[1] - 1), seq[0, 20:]]
    assert np.abs(short - res.logprobs[2]).max() > 1e-2



def test_two_calls_at_once_give_the_rows_of_one_at_a_time():
    """The CPU default (this test process: one process, CPU) runs two sampler calls at once;
    every token and log-prob equals those of the same calls one after the other, and on_call
    still reports the calls in order."""
    assert sampler_workers() == 2
    m = init_model(mc.tiny(initializer_range=0.125), seed=5)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(4, 512, size=int(n)).tolist() for n in rng.integers(3, 40, 7)]
    kw = dict(prompts_per_call=2, seed=11, num_samples=3, max_new_tokens=20, temperature=1.0,
              stop_tokens=[7, 9])
    done1, done2 = [], []
    one = generate_in_calls(m, prompts, workers=1, on_call=done1.append, **kw)
    two = generate_in_calls(m, prompts, workers=2, on_call=done2.append, **kw)
    assert done1 == done2 == [2, 4, 6, 7]
    assert one.tokens == two.tokens and one.finish_reasons == two.finish_reasons
    assert len(set(map(tuple, one.tokens))) > 10  # sampled rows, not one repeated
    for a, b in zip(one.logprobs + one.sampling_logprobs, two.logprobs + two.sampling_logprobs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.lengths, two.lengths)


def test_in_order_overlaps_calls_keeps_order_and_stops_lazily():
    """Results come in the items' order even when a later call finishes first; two calls are
    running at once; a consumer that stops after k results has started at most k + 1 calls,
    and an error is raised in its turn."""
    started, running, peak = [], [0], [0]
    lock = threading.Lock()

    def slow_first(i):
        with lock:
            started.append(i)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3 if i == 0 else 0.05)
        with lock:
            running[0] -= 1
        return i * i

    assert list(in_order(slow_first, range(6), workers=2)) == [0, 1, 4, 9, 16, 25]
    assert peak[0] == 2
    started.clear()
    gen = in_order(slow_first, range(100), workers=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 4]
    gen.close()
    assert sorted(started) == [0, 1, 2, 3]  # 3 used, 1 started beside the third
    assert list(in_order(slow_first, range(4), workers=1)) == [0, 1, 4, 9]

    def fails_at_2(i):
        if i == 2:
            raise ValueError("call 2")
        return i
    with pytest.raises(ValueError, match="call 2"):
        list(in_order(fails_at_2, range(5), workers=2))


def test_calls_run_under_the_callers_mesh_and_axis_rules():
    """A worker thread starts without the caller's jax.set_mesh and axis rules; each call
    gets both, so a sampler call shards its rows as it would in the caller's thread."""
    from phimr_jax.model.sharding import axis_rules, current_rules, make_mesh

    def probe(_):
        mesh = jax.sharding.get_abstract_mesh()
        return (None if mesh.empty else dict(mesh.shape)), current_rules()
    rules = (("batch", "data"), ("length", None))
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    with jax.set_mesh(mesh), axis_rules(rules):
        seen = list(in_order(probe, range(3), workers=2))
    assert seen == [({"data": 4, "fsdp": 2, "tensor": 1}, rules)] * 3
    assert list(in_order(probe, range(2), workers=2))[0][0] is None  # none active: none given
