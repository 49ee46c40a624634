"""RL objectives for stage 4: GRPO and PPO losses on per-token log-probs (pure functions).

Shapes: `logp`, `old_logp`, `ref_logp`, `mask`: [sequences, tokens] (mask = 1 on generated
tokens); `rewards`: [sequences] (+1 / -1 from Math-Verify); sequences of one prompt are
contiguous groups of `group_size`.

GRPO (DeepSeekMath; the paper's default here):
- advantage of every token of a sequence = its reward normalised within its prompt's group,
  (r - mean_group) / (std_group + 1e-4) (TRL's convention; std with Bessel's correction), or
  r - mean_group when `scale_rewards=False` (Dr. GRPO);
- clipped importance ratio: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A),
  rho = exp(logp - old_logp), eps = 0.2 (TRL / Tunix default; the paper publishes none);
- optional KL to the frozen reference with the k3 estimator exp(q) - q - 1, q = ref - logp
  (unbiased, always >= 0), weight beta (0.0 = off, TRL's default; Tunix uses 0.04);
- aggregation "token": every generated token of the batch weighs the same (sum / all tokens,
  DAPO's choice: long answers are not down-weighted); "sequence": mean over each sequence's
  tokens, then over sequences (the original GRPO).
PPO: the same clipped surrogate with per-token GAE advantages from a learned value model, plus a
clipped value loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_EPS = 1e-4


def group_advantages(rewards: jax.Array, group_size: int, scale: bool = True) -> jax.Array:
    """Per-sequence GRPO advantages, [sequences], normalised within each prompt's group."""
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale:
        std = jnp.std(groups, axis=1, ddof=1, keepdims=True) if group_size > 1 else \
            jnp.zeros_like(centred)
        centred = centred / (std + STD_EPS)
    return centred.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref): exp(q) - q - 1 with q = ref_logp - logp."""
    q = ref_logp - logp
    return jnp.exp(q) - q - 1.0


def aggregate_sum(per_token: jax.Array, mask: jax.Array, mode: str):
    """(numerator, weight) of a [sequences, tokens] loss over the generated tokens, so that
    numerator / weight is the loss and partial sums over microbatches add up exactly:
    "token": sum over all tokens / number of tokens; "sequence": each sequence's mean over its
    tokens, summed / number of sequences with at least one token (padding rows count nowhere)."""
    if mode == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    if mode == "sequence":
        lengths = jnp.sum(mask, axis=1)
        per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(lengths, 1.0)
        return jnp.sum(per_seq), jnp.sum((lengths > 0).astype(jnp.float32))
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {mode!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Reduce a [sequences, tokens] loss over the generated tokens ("token" or "sequence")."""
    total, weight = aggregate_sum(per_token, mask, mode)
    return total / jnp.maximum(weight, 1.0)


def clipped_surrogate(logp, old_logp, advantages, clip_eps: float):
    """(per-token -min(rho A, clip(rho) A), per-token clipped indicator)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def grpo_per_token(logp, old_logp, ref_logp, advantages, *, clip_eps: float, kl_beta: float):
    """Per-token GRPO terms: (loss, clipped indicator, k3 KL to the reference), [seq, tokens].
    `advantages`: [sequences], computed over whole groups (before any filtering), or already
    per token, [rows, tokens] (rows that hold several responses)."""
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    surrogate, was_clipped = clipped_surrogate(logp, jax.lax.stop_gradient(old_logp), adv,
                                               clip_eps)
    kl = k3_kl(logp, jax.lax.stop_gradient(ref_logp))
    return surrogate + kl_beta * kl, was_clipped, kl


def grpo_loss(logp, old_logp, ref_logp, mask, advantages, *, clip_eps: float = 0.2,
              kl_beta: float = 0.0, aggregation: str = "token"):
    """(loss, metrics) of GRPO on one batch. `ref_logp` only matters when kl_beta > 0."""
    per_token, was_clipped, kl = grpo_per_token(logp, old_logp, ref_logp, advantages,
                                                clip_eps=clip_eps, kl_beta=kl_beta)
    metrics = {"clip_fraction": aggregate(was_clipped, mask, "token"),
               "kl": aggregate(kl, mask, "token"),
               "advantage_abs": jnp.mean(jnp.abs(advantages))}
    return aggregate(per_token, mask, aggregation), metrics


def gae(token_rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns) [sequences, tokens] by generalised advantage estimation.

    values[t] estimates the return from token t on; the value after the last generated token is
    0 (the episode ends). Tokens outside `mask` get 0."""
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (token_rewards + gamma * next_values - values) * mask

    def step(carry, x):
        delta, m = x
        adv = delta + gamma * lam * carry * m
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(values.shape[0]), (deltas.T[::-1], mask.T[::-1]))
    adv = adv[::-1].T * mask
    return adv, (adv + values) * mask


def terminal_rewards(rewards, mask):
    """Sequence rewards placed on each sequence's last generated token: [sequences, tokens]."""
    last = jnp.argmax(jnp.cumsum(mask, axis=1), axis=1)
    return jax.nn.one_hot(last, mask.shape[1]) * rewards[:, None]


def ppo_per_token(logp, old_logp, values, old_values, advantages, returns, *,
                  clip_eps: float = 0.2, value_clip_eps: float = 0.2):
    """Per-token PPO terms: (policy loss, clipped value loss, clipped indicator), all
    [sequences, tokens]; advantages/returns per token (GAE), held fixed (stop_gradient)."""
    adv = jax.lax.stop_gradient(advantages)
    surrogate, was_clipped = clipped_surrogate(logp, jax.lax.stop_gradient(old_logp), adv,
                                               clip_eps)
    returns, old_values = jax.lax.stop_gradient(returns), jax.lax.stop_gradient(old_values)
    v_clipped = old_values + jnp.clip(values - old_values, -value_clip_eps, value_clip_eps)
    value_loss = 0.5 * jnp.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return surrogate, value_loss, was_clipped


def normalize_advantages(adv, mask):
    """Whiten token advantages over the masked tokens (mean 0, std 1)."""
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(adv * mask) / n
    std = jnp.sqrt(jnp.sum(((adv - mean) * mask) ** 2) / n)
    return (adv - mean) / (std + 1e-8)


def ppo_loss(logp, old_logp, values, old_values, advantages, returns, mask, *,
             clip_eps: float = 0.2, value_clip_eps: float = 0.2, value_coef: float = 0.5,
             aggregation: str = "token", normalize: bool = True):
    """(loss, metrics) of PPO: clipped surrogate + value_coef * clipped value loss."""
    adv = normalize_advantages(advantages, mask) if normalize else advantages
    surrogate, value_loss, was_clipped = ppo_per_token(
        logp, old_logp, values, old_values, adv, returns, clip_eps=clip_eps,
        value_clip_eps=value_clip_eps)
    policy = aggregate(surrogate, mask, aggregation)
    vloss = aggregate(value_loss, mask, aggregation)
    metrics = {"policy_loss": policy, "value_loss": vloss,
               "clip_fraction": aggregate(was_clipped, mask, "token")}
    return policy + value_coef * vloss, metrics
