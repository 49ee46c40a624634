"""Token log-probs and the cross-entropy loss without [tokens, vocab] float32 logits.

The LM head runs over chunks of the sequence inside `lax.map`, each chunk rematerialised in the
backward pass, so at most one [batch, chunk, vocab] block of float32 logits exists at a time —
for Phi-4-mini's 200,064-entry vocab at 16K tokens that is the difference between 13 GB of
logits per sequence and a few hundred MB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(model, batch: dict, chunk_size: int = 1024, *, long_rope=None,
                   with_entropy: bool = False, temperature=None, vocab_limit=None):
    """(log p(targets | inputs), argmax == target) per token, both [batch, seq] (f32, bool);
    with_entropy: a third output, the entropy of the model's next-token distribution (f32).

    batch: "inputs", "targets", and optionally "positions", "segment_ids" ([batch, seq] ints).
    long_rope: None = HF's per-call LongRoPE choice, or a fixed regime (RL scores rollouts with
    the regime the sampler used).
    temperature: None (the model itself), or [batch] per-row temperatures: log-probs (and the
    entropy) of softmax(logits / T), the distribution RL samples its rollouts from (as TRL and
    verl score them); a row's T <= 0 (a padding row) counts as 1.
    vocab_limit: None, or a (traced) id bound: logits of ids >= it are excluded from the
    softmax, as the sampler excludes padded embedding rows that no tokenizer produces.
    """
    hidden = model.hidden_states(batch["inputs"], batch.get("positions"),
                                 batch.get("segment_ids"), long_rope=long_rope)
    targets = batch["targets"]
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    inv_t = None if temperature is None else \
        1.0 / jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)[:, None, None]
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h, tgt = args
        logits = model.logits(h)  # [b, chunk, vocab] float32
        if inv_t is not None:
            logits = logits * inv_t
        if vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -1e30)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        out = (picked - lse, jnp.argmax(logits, axis=-1) == tgt)
        if with_entropy:  # H = logsumexp - E_p[logit]; a metric, so no gradient through it
            fixed = jax.lax.stop_gradient(logits)
            probs = jax.nn.softmax(fixed, axis=-1)
            out += (jax.lax.stop_gradient(lse) - jnp.sum(probs * fixed, axis=-1),)
        return out

    outs = jax.lax.map(one_chunk, (hidden, targets))
    return tuple(x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for x in outs)


def cross_entropy(model, batch: dict, chunk_size: int = 1024):
    """Token-weighted next-token cross-entropy over `loss_mask`.

    Returns (loss_sum, weight, metric_sums): the trainer divides sums by the batch's total
    weight, so gradient accumulation and packing give exactly the token-weighted mean.
    """
    logp, correct = token_logprobs(model, batch, chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    loss_sum = -jnp.sum(logp * mask)
    weight = jnp.sum(mask)
    return loss_sum, weight, {"loss": loss_sum, "token_accuracy": jnp.sum(correct * mask)}


def cross_entropy_weight(batch: dict) -> jax.Array:
    """The normaliser of `cross_entropy` for a whole batch: the number of trained tokens."""
    return jnp.sum(batch["loss_mask"].astype(jnp.float32))
