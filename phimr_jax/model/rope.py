"""Partial rotary embedding with LongRoPE, exactly as HF `Phi3RotaryEmbedding` computes it.

- Only the first `rotary_dim` dims of each head rotate (NeoX `rotate_half`, not interleaved);
  the rest pass through.
- `inv_freq = 1 / (ext_factor * theta ** (arange(0, rotary_dim, 2) / rotary_dim))`, in float32,
  with `ext_factor` the short or the long factor list.
- Both cos and sin are multiplied by the attention factor (mscale), short and long alike.
- Regime ("auto"): one choice per forward pass for the whole batch: long factors iff
  `max(positions) + 1 > original_max_position_embeddings` (HF's `longrope_frequency_update`).
  Callers may force a regime (`long_rope=True/False`), which the RL fixed-regime mode relies
  on, or give one per row (a [batch] bool): the KV cache does, so that each row of a sampled
  batch follows the rule HF applies to that sequence on its own (`auto_long_rope_per_row`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from phimr_jax.model.config import ModelConfig


def inv_freqs(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) inverse frequencies, float32 numpy arrays of length rotary_dim // 2.

    Computed in float32 like torch (`arange(...).float() / dim`, `base ** that`, product with
    the float32 factors, then the reciprocal) so that angles at large positions match HF.
    """
    dim = cfg.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.power(np.float32(cfg.rope_theta), exponent, dtype=np.float32)
    ones = np.ones(dim // 2, np.float32)

    def with_factor(factors):
        ext = ones if factors is None else np.asarray(factors, np.float32)
        return (np.float32(1.0) / (ext * base)).astype(np.float32)

    if cfg.rope_type != "longrope":
        plain = with_factor(None)
        return plain, plain
    return with_factor(cfg.short_factor), with_factor(cfg.long_factor)


def attention_factor(cfg: ModelConfig) -> float:
    """The LongRoPE mscale applied to cos and sin (1.0 for plain RoPE)."""
    if cfg.rope_type != "longrope":
        return 1.0
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    factor = cfg.rope_factor
    if factor is None:  # Phi3: the ratio of the context lengths, not a `factor` key.
        factor = cfg.max_position_embeddings / cfg.original_max_position_embeddings
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(cfg.original_max_position_embeddings))


def auto_long_rope(cfg: ModelConfig, positions: jnp.ndarray) -> jnp.ndarray:
    """HF's per-forward rule: long factors iff max(positions) + 1 > original max (traced)."""
    if cfg.rope_type != "longrope":
        return jnp.asarray(False)
    return jnp.max(positions) + 1 > cfg.original_max_position_embeddings


def auto_long_rope_per_row(cfg: ModelConfig, positions: jnp.ndarray) -> jnp.ndarray:
    """HF's rule applied to each row on its own ([batch] bool, traced): what HF picks for that
    row's sequence alone. Positions count a row's real tokens (left padding sits at 0), so a
    padded row decides by its own length, not the padded width."""
    if cfg.rope_type != "longrope":
        return jnp.zeros(positions.shape[:1], bool)
    return jnp.max(positions, axis=-1) + 1 > cfg.original_max_position_embeddings


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray, long_rope, dtype) -> tuple:
    """cos, sin of shape [batch, seq, rotary_dim], already scaled by the attention factor.

    `long_rope` (possibly traced) chooses the factor list: a bool scalar for the whole batch,
    or a [batch] bool per row. A select between the two tables, so a regime change never
    recompiles, and each row's angles are the same f32 products as in a batch of one.
    """
    short, long = inv_freqs(cfg)
    long_rope = jnp.asarray(long_rope, bool)
    if long_rope.ndim == 1:  # per row: [batch] -> [batch, 1 (seq), 1 (freq)]
        long_rope = long_rope[:, None, None]
    inv = jnp.where(long_rope, jnp.asarray(long), jnp.asarray(short))
    freqs = positions[..., None].astype(jnp.float32) * inv  # exact f32 products, as in torch
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_factor(cfg)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the first rotary_dim dims of x [batch, seq, heads, head_dim] (rotate_half).

    The arithmetic runs in float32 and is rounded to x's dtype once. In float32 that is HF's
    computation exactly. In bfloat16, HF rounds each product and the sum; one rounding is at
    least as accurate, and much cheaper where bfloat16 elementwise math is emulated (XLA:CPU
    converts around every op: the rotary forward + backward was ~10% of the demo model's
    training step). cos/sin keep their dtype's rounding, as HF's `cos.to(x.dtype)`.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(jnp.float32)
    sin = sin[:, :, None, :].astype(jnp.float32)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1).astype(dtype)
