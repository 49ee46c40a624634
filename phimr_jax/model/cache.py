"""The decoder's KV caches: `KVCache`, the stacked per-layer keys/values that
`Phi3ForCausalLM.decode` writes and reads (plus the segment ids, next slot and per-row
LongRoPE regime it needs), and `StepCache`, the same contents in the per-layer layout of the
sampler's single-token loop (`Phi3ForCausalLM.decode_step`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from phimr_jax.model.sharding import constrain


@struct.dataclass
class KVCache:
    """Preallocated per-layer keys/values plus what decode needs to mask and position them."""

    k: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    v: jax.Array  # same
    segment_ids: jax.Array  # [batch, max_length] int32; 0 = empty slot or padding
    index: jax.Array  # int32 scalar: the next slot to write
    long_rope: jax.Array  # [batch] bool: LongRoPE regime of each row's cached keys

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


@struct.dataclass
class StepCache:
    """The KV cache of the sampler's single-token loop (`Phi3ForCausalLM.decode_step`): the
    same contents as a `KVCache`, one array per layer in [batch, kv_heads, max_length,
    head_dim] order. Why not KVCache itself (measured, bench sampler, 2 loaded CPU cores):
    reading layer l of the stacked [layers, batch, length, kv, hd] cache and putting its KV-head
    axis before the length for the attention matmuls copied the whole layer every step, about
    1.7 of the 4.6 ms a step took. Here the attention matmuls read the layer as it is stored,
    and each step writes one slot per layer in place. Keys are stored transposed, [hd, slots]:
    the score matmul q K^T then reads them as a plain [hd, slots] right operand; with [slots,
    hd] keys XLA:CPU ran it ~7x slower at 512 rows (float32: 9.7 against 1.3 ms a layer)."""

    k: tuple  # num_layers arrays [batch, kv_heads, head_dim, max_length]
    v: tuple  # num_layers arrays [batch, kv_heads, max_length, head_dim]
    segment_ids: jax.Array  # [batch, max_length] int32; 0 = empty slot or padding
    index: jax.Array  # int32 scalar: the next slot to write
    long_rope: jax.Array  # [batch] bool: LongRoPE regime of each row's cached keys

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]

    @classmethod
    def from_cache(cls, cache: KVCache) -> "StepCache":
        """The step layout of a filled KVCache (one transpose per layer, once per prefill)."""
        split = lambda x, keys: tuple(_step_layout(x[i], keys) for i in range(x.shape[0]))
        return cls(k=split(cache.k, True), v=split(cache.v, False), segment_ids=cache.segment_ids,
                   index=cache.index, long_rope=cache.long_rope)

    def set_rows(self, rows: jax.Array, fresh: KVCache) -> "StepCache":
        """Rows `rows` of keys/values replaced by those of `fresh` (a KVCache of len(rows)
        rows and the same length); out-of-range indices are dropped. Segment ids, index and
        the regime stay (the caller sets the regime)."""
        put = lambda old, new, keys: tuple(
            o.at[rows].set(_step_layout(new[i], keys), mode="drop") for i, o in enumerate(old))
        return self.replace(k=put(self.k, fresh.k, True), v=put(self.v, fresh.v, False))


def _step_layout(x: jax.Array, keys: bool) -> jax.Array:
    """[batch, length, kv, hd] -> [batch, kv, hd, length] (keys) or [batch, kv, length, hd]
    (values), sharded like the activations."""
    if keys:
        return constrain(x.transpose(0, 2, 3, 1), ("batch", "kv_heads", "head_dim", "cache_length"))
    return constrain(jnp.swapaxes(x, 1, 2), ("batch", "kv_heads", "cache_length", "head_dim"))
