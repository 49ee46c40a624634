"""GRPO / PPO losses, GAE and the paper's stabilisers against hand-computed values (1e-6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phimr_jax.stages.rl import objectives as rl
from phimr_jax.stages.rl import stabilisers as st

A = 1.0 / (math.sqrt(2.0) + 1e-4)  # advantage of +1 in a {+1, -1} group (std with ddof=1)


def test_group_advantages_by_hand():
    adv = rl.group_advantages(jnp.array([1.0, -1.0, 1.0, 1.0]), group_size=2)
    np.testing.assert_allclose(adv, [A, -A, 0.0, 0.0], atol=1e-6)
    adv = rl.group_advantages(jnp.array([1.0, -1.0, 1.0, 1.0]), group_size=2, scale=False)
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0], atol=1e-6)


def test_grpo_clipping_masking_and_aggregation_by_hand():
    # Two sequences of one group (rewards +1, -1): ratios 1.5 / 0.5 on the two real tokens,
    # a third, masked token that must not count.
    ratios = np.array([[1.5, 0.5, 9.0], [1.5, 0.5, 9.0]])
    old = np.zeros((2, 3))
    logp = np.log(ratios)
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    rewards = jnp.array([1.0, -1.0])
    # A > 0: min(1.5A, 1.2A) = 1.2A, min(0.5A, 0.8A) = 0.5A; A < 0: 1.5A and 0.8A.
    per_token = np.array([[-1.2 * A, -0.5 * A], [1.5 * A, 0.8 * A]])
    adv = rl.group_advantages(rewards, group_size=2)
    loss, metrics = rl.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(logp),
                                 jnp.asarray(mask), adv, clip_eps=0.2, aggregation="token")
    assert float(loss) == pytest.approx(per_token.sum() / 4, abs=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 4)  # 1.5 with A>0, 0.5 with A<0
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-7)  # ref == policy
    # Per-sequence aggregation with unequal lengths: mean over each sequence, then over both.
    mask2 = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss2, _ = rl.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(logp),
                            jnp.asarray(mask2), adv, aggregation="sequence")
    assert float(loss2) == pytest.approx(((-1.2 * A - 0.5 * A) / 2 + 1.5 * A) / 2, abs=1e-6)


def test_grpo_kl_term_by_hand():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    mask = jnp.ones((1, 2))
    q = np.log([0.5, 2.0])  # ref - logp
    k3 = np.exp(q) - q - 1.0
    adv = rl.group_advantages(jnp.array([1.0]), group_size=1)
    loss, metrics = rl.grpo_loss(logp, logp, ref, mask, adv, kl_beta=0.04)
    # A single-sample group has advantage 0: the loss is the KL term alone.
    assert float(loss) == pytest.approx(0.04 * k3.mean(), abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(k3.mean(), abs=1e-6)
    grads = jax.grad(lambda r: rl.grpo_loss(logp, logp, r, mask, adv, kl_beta=0.04)[0])(ref)
    assert np.all(np.asarray(grads) == 0)  # no gradient into the reference


def test_gae_by_hand():
    values = jnp.array([[0.5, 0.6, 0.7]])
    mask = jnp.ones((1, 3))
    rewards = rl.terminal_rewards(jnp.array([1.0]), mask)
    np.testing.assert_allclose(rewards, [[0.0, 0.0, 1.0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [[0.225, 0.25, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.725, 0.85, 1.0]], atol=1e-6)
    # A shorter sequence: the reward sits on its last real token, padding gets nothing.
    mask = jnp.array([[1.0, 1.0, 0.0]])
    rewards = rl.terminal_rewards(jnp.array([-1.0]), mask)
    adv, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[-1.5, -1.6, 0.0]], atol=1e-6)  # -1 - V_t, Monte Carlo


def test_ppo_loss_by_hand():
    logp = jnp.log(jnp.array([[1.5, 0.5]]))
    zeros = jnp.zeros((1, 2))
    adv = jnp.array([[1.0, 1.0]])
    values, old_values, returns = jnp.array([[0.9, 0.0]]), jnp.array([[0.5, 0.0]]), \
        jnp.array([[1.0, 1.0]])
    mask = jnp.ones((1, 2))
    loss, m = rl.ppo_loss(logp, zeros, values, old_values, adv, returns, mask, clip_eps=0.2,
                          value_clip_eps=0.2, value_coef=0.5, normalize=False)
    policy = (-1.2 - 0.5) / 2
    # token 0: unclipped (0.9-1)^2 = 0.01, clipped value 0.7 -> 0.09: max 0.09; token 1: 1.0.
    value = 0.5 * (0.09 + 1.0) / 2
    assert float(m["policy_loss"]) == pytest.approx(policy, abs=1e-6)
    assert float(m["value_loss"]) == pytest.approx(value, abs=1e-6)
    assert float(loss) == pytest.approx(policy + 0.5 * value, abs=1e-6)


def test_temperature_schedule_values():
    t = [st.annealed_temperature(s, 100) for s in (0, 10, 25, 49, 50, 80, 99)]
    np.testing.assert_allclose(t, [1.0, 0.92, 0.8, 0.608, 0.6, 0.6, 0.6], atol=1e-9)
    assert st.annealed_temperature(5, 10, fraction=0.0) == 0.6


def test_length_filter_keeps_uniform_groups():
    lengths = np.array([[100, 100, 100, 100],    # cv 0
                        [90, 110, 100, 100],     # cv 0.0707
                        [20, 400, 100, 300]])    # cv ~0.77
    keep = st.uniform_length_prompts(lengths, max_length_cv=0.1)
    assert keep.tolist() == [True, True, False]
    assert st.length_cv([90, 110, 100, 100]) == pytest.approx(math.sqrt(50) / 100)


def test_rebalancing_keeps_positives_and_as_many_negatives():
    rewards = np.array([[1, 1, 1, -1],     # accuracy 0.75 > 0.5: dropped
                        [1, -1, -1, -1],   # keep the positive + 1 of 3 negatives
                        [1, 1, -1, -1],    # 0.5: kept, all four
                        [-1, -1, -1, -1]])  # no positive: keeps nothing
    out = st.rebalance(rewards, max_accuracy=0.5, rng=np.random.default_rng(0))
    assert out.keep_prompt.tolist() == [False, True, True, True]
    assert out.keep_response[0].sum() == 0
    assert out.keep_response[1, 0] and out.keep_response[1].sum() == 2
    assert out.keep_response[2].all() and out.keep_response[3].sum() == 0
    np.testing.assert_allclose(out.accuracy, [0.75, 0.25, 0.5, 0.0])
    m = st.filter_metrics(np.array([True, False, True, True]), out)
    assert m == {"filter/length_kept": 3, "filter/length_dropped": 1,
                 "filter/accuracy_kept": 3, "filter/accuracy_dropped": 1,
                 "filter/responses_kept": 6}
    # No accuracy cut (the demo's max_accuracy 1.0): a 3-of-4 group keeps its 3 positives and
    # its one negative; a group with every response correct teaches nothing (all advantages 0).
    easy = np.array([[1, 1, 1, -1], [1, 1, 1, 1]])
    out = st.rebalance(easy, max_accuracy=1.0, rng=np.random.default_rng(0))
    assert out.keep_prompt.tolist() == [True, False]
    assert out.keep_response.tolist() == [[True] * 4, [False] * 4]


def test_hard_prompt_sampler_oversamples_and_resumes():
    s = st.HardPromptSampler(10, seed=0, oversample=5.0, hard_accuracy=0.25)
    s.update([0, 1], [0.0, 1.0])
    counts = np.zeros(10)
    for _ in range(2000):
        counts[s.draw(1)] += 1
    assert counts[0] > 3 * counts[2] and s.num_hard == 1
    state = s.get_state()
    a = [s.draw(3).tolist() for _ in range(5)]
    t = st.HardPromptSampler(10, seed=123)
    t.set_state(state)
    assert [t.draw(3).tolist() for _ in range(5)] == a
