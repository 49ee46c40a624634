"""Phi-4-mini (HF `Phi3ForCausalLM`) in Flax NNX.

Layout choices (all exact w.r.t. HF, see tests/model/test_parity.py):
- The decoder layers are stacked ([num_layers, ...] parameters) and run with `lax.scan`, so a
  32-layer model compiles once per layer shape, and remat applies per layer. `scan_layers=False`
  runs the same per-layer function in a Python loop over the same stacked parameters (each
  layer compiled separately): for a few layers it avoids the scan's stacked residual buffers
  (2 CPU cores: the demo model's forward + backward 0.65 -> 0.55 s); checkpoints do not change.
- HF's fused `qkv_proj` / `gate_up_proj` are stored split (q, k, v / gate, up) with separate
  head axes, so tensor parallelism shards whole heads; conversion splits and re-fuses them
  bit-exactly (phimr_jax/model/hf_io.py).
- Packed sequences: `segment_ids` (0 = padding) restrict attention to earlier tokens of the same
  segment; `positions` restart per segment and drive RoPE.
- KV cache: `decode()` writes new keys/values at `cache.index` and attends over all filled slots
  of the same segment. The cache remembers the LongRoPE regime of its keys, one per row: the
  regime is chosen on the first call (HF's rule applied to each row's own positions, i.e. what
  HF picks for that sequence alone, or `long_rope=`) and kept for later steps, so a row never
  mixes short- and long-factor keys. A row crossing `original_max_position_embeddings` with
  short-regime keys therefore keeps the short factors; HF instead drops that sequence's cache
  and re-encodes it with the long factors — the sampler does that re-encode explicitly, per
  row (`needs_reencode`).
- Matmuls, RMSNorm and SwiGLU have hand-written backward passes (phimr_jax/model/layers.py):
  same values, but XLA:CPU no longer picks transposed layouts for their gradients, and in
  bfloat16 every backward matmul takes bfloat16 inputs with float32 accumulation.
- Attention: `ModelConfig.attention_impl` picks the reference XLA attention (default), the
  memory-efficient blockwise kernel, splash (TPU) or cuDNN (GPU, unpacked rows only); see
  phimr_jax/model/attention.py. KV-cache decoding uses blockwise for multi-token calls when
  attention_impl != "xla", and the reference for single-token steps.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from phimr_jax.model import rope
from phimr_jax.model.attention import make_attention, xla_attention
from phimr_jax.model.config import ModelConfig
from phimr_jax.model.layers import project, rms_norm, swiglu
from phimr_jax.model.sharding import constrain

# Stacked per-layer parameters: name -> logical axes (after the leading "layers" axis).
LAYER_PARAM_AXES = {
    "attn_norm": ("norm",),
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "mlp_norm": ("norm",),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}


def layer_param_shapes(cfg: ModelConfig) -> dict:
    d, h, k, hd, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                      cfg.intermediate_size)
    return {"attn_norm": (d,), "q": (d, h, hd), "k": (d, k, hd), "v": (d, k, hd),
            "o": (h, hd, d), "mlp_norm": (d,), "gate": (d, f), "up": (d, f), "down": (f, d)}


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference GQA attention. q [B,T,H,hd], k/v [B,S,K,hd], mask bool [B|1,T,S] (True=keep).

    Query head h reads KV head h // (H // K), like HF's repeat_kv. Scores and softmax in f32.
    (Kept here for callers; the implementation is attention.xla_attention.)
    """
    return xla_attention(q, k, v, mask)


def _over_layers(body, carry, xs, scan: bool):
    """`lax.scan(body, carry, xs)` over the leading (layer) axis of xs, or the same body in a
    Python loop (outputs of body are not collected: the decoder's are None)."""
    if scan:
        return jax.lax.scan(body, carry, xs)[0]
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, _ = body(carry, jax.tree.map(lambda a: a[i], xs))
    return carry


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


class Phi3ForCausalLM(nnx.Module):
    """Phi3 decoder with a tied (or separate) LM head. Call with token ids -> f32 logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        pdt = cfg.jnp_param_dtype
        n = cfg.num_layers
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
                               logical_axes=("vocab", "embed"))
        for name, shape in layer_param_shapes(cfg).items():
            if name.endswith("norm"):
                value = jnp.ones((n, *shape), pdt)
            else:
                value = init(rngs.params(), (n, *shape), pdt)
            setattr(self, name, nnx.Param(value, logical_axes=("layers",) + LAYER_PARAM_AXES[name]))
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pdt), logical_axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt),
                                     logical_axes=("embed", "vocab"))

    # ------------------------------------------------------------------ public API
    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, *, long_rope=None) -> jax.Array:
        """Logits [batch, seq, vocab] (float32) of a full forward pass.

        positions: [batch, seq] ints (default 0..seq-1); segment_ids: [batch, seq] ints for packed
        rows (0 = padding); long_rope: None for HF's automatic short/long choice, or a bool.
        """
        return self.logits(self.hidden_states(input_ids, positions, segment_ids,
                                              long_rope=long_rope))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, *, long_rope=None):
        """Final-norm hidden states [batch, seq, hidden] in the compute dtype (no LM head), so
        losses can project them in chunks instead of materialising full-vocab logits."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        bsz, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
        if long_rope is None:
            long_rope = rope.auto_long_rope(cfg, positions)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids)
        # Causal on token order, same segment, sliding window: built once for all layers.
        attn = make_attention(cfg.attention_impl, t=seq, s=seq, q_segment_ids=segment_ids,
                              kv_segment_ids=segment_ids, sliding_window=cfg.sliding_window,
                              block_size=cfg.attention_block_size, dtype=cfg.jnp_dtype)
        h, _ = self._run_layers(input_ids, positions, long_rope, attn, cache=None)
        return h

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on hidden states (tied: hidden @ embed^T), float32 logits."""
        dt = self.config.jnp_dtype
        if self.config.tie_word_embeddings:
            return jnp.einsum("btd,vd->btv", hidden.astype(dt), self.embed[...].astype(dt),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", hidden.astype(dt), self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_length` tokens."""
        cfg = self.config
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.resolved_head_dim)
        dtype = dtype or cfg.jnp_dtype
        # Sharded like the activations: rows over the batch axes, KV heads over `tensor`.
        axes = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
        return KVCache(k=constrain(jnp.zeros(shape, dtype), axes),
                       v=constrain(jnp.zeros(shape, dtype), axes),
                       segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
                       index=jnp.zeros((), jnp.int32),
                       long_rope=jnp.zeros((batch_size,), bool))

    def decode(self, input_ids: jax.Array, cache: KVCache, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, *, long_rope=None, logits_at=None):
        """Run `input_ids` [batch, T] through the model on top of `cache`; returns
        (logits [batch, T, vocab] float32, updated cache). Prefill is the first call (T = prompt
        length), each later call usually has T = 1. `logits_at` (an index into T, traced) asks
        for the logits of that one position only ([batch, 1, vocab]): a prefill needs just its
        last position, and [batch, prompt, vocab] float32 logits would not fit at 200K vocab.

        positions default to index + 0..T-1; segment_ids default to 1 (0 marks padding that no
        real token attends to, e.g. left padding of ragged prompts). The LongRoPE regime (per
        row) is fixed on the first call unless `long_rope` (a bool, or [batch] bools) is given
        (see module docstring).
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        bsz, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(cache.index + jnp.arange(seq, dtype=jnp.int32),
                                         (bsz, seq))
        if segment_ids is None:
            segment_ids = jnp.ones((bsz, seq), jnp.int32)
        if long_rope is None:
            long_rope = jnp.where(cache.index == 0, rope.auto_long_rope_per_row(cfg, positions),
                                  cache.long_rope)
        long_rope = jnp.broadcast_to(jnp.asarray(long_rope, bool), (bsz,))
        cache_segments = jax.lax.dynamic_update_slice(
            cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        # Queries at slots index..index+T-1 over every cache slot; single-token steps keep the
        # reference attention (small scores), multi-token calls follow attention_impl.
        impl = "xla" if seq == 1 else cfg.attention_impl
        attn = make_attention(impl, t=seq, s=cache.max_length, q_segment_ids=segment_ids,
                              kv_segment_ids=cache_segments, q_offset=cache.index,
                              sliding_window=cfg.sliding_window,
                              block_size=cfg.attention_block_size, dtype=cfg.jnp_dtype)
        cache = cache.replace(segment_ids=cache_segments)
        h, cache = self._run_layers(input_ids, positions, long_rope, attn, cache=cache)
        cache = cache.replace(index=cache.index + seq, long_rope=long_rope)
        if logits_at is not None:
            h = jax.lax.dynamic_slice_in_dim(h, logits_at, 1, axis=1)
        return self.logits(h), cache

    def needs_reencode(self, cache: KVCache, next_length) -> jax.Array:
        """[batch] bool, true for the rows where HF would drop the cache of that sequence:
        keys in the short regime while the row's length (its real tokens, including the one
        about to be fed; an int or [batch] ints) exceeds original_max_position_embeddings."""
        if self.config.rope_type != "longrope":
            return jnp.zeros_like(cache.long_rope)
        return (~cache.long_rope) & (next_length > self.config.original_max_position_embeddings)

    # ------------------------------------------------------------------ internals
    def _layer_params(self) -> dict:
        return {name: getattr(self, name)[...] for name in LAYER_PARAM_AXES}

    def _run_layers(self, input_ids, positions, long_rope, attn, cache: Optional[KVCache]):
        """attn: (q, k, v) -> out, from attention.make_attention (carries the masking)."""
        cfg = self.config
        dt = cfg.jnp_dtype
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        h = constrain(h, ("batch", "length", "act_embed"))
        cos, sin = rope.cos_sin(cfg, positions, long_rope, dt)
        eps = cfg.rms_norm_eps

        def block(h, p, kv_fn):
            x = rms_norm(h, p["attn_norm"], eps)
            q = project("btd,dhk->bthk", x, p["q"].astype(dt))
            k = project("btd,dhk->bthk", x, p["k"].astype(dt))
            v = project("btd,dhk->bthk", x, p["v"].astype(dt))
            q = rope.apply_rotary(q, cos, sin)
            k = rope.apply_rotary(k, cos, sin)
            k, v, extra = kv_fn(k, v)
            out = attn(q, k, v)
            h = h + project("bthk,hkd->btd", out, p["o"].astype(dt))
            x = rms_norm(h, p["mlp_norm"], eps)
            gate = project("btd,df->btf", x, p["gate"].astype(dt))
            up = project("btd,df->btf", x, p["up"].astype(dt))
            h = h + project("btf,fd->btd", swiglu(gate, up), p["down"].astype(dt))
            return constrain(h, ("batch", "length", "act_embed")), extra

        params = self._layer_params()
        if cache is None:
            def body(h, p):
                h, _ = block(h, p, lambda k, v: (k, v, None))
                return h, None
            h = _over_layers(_remat(body, cfg.remat_policy), h, params, cfg.scan_layers)
        else:
            def body(carry, xs):
                h, ck, cv = carry
                p, layer = xs

                def write_and_read(k, v):
                    start = (layer, 0, cache.index, 0, 0)
                    nk = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], start)
                    nv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], start)
                    return nk[layer].astype(dt), nv[layer].astype(dt), (nk, nv)

                h, (ck, cv) = block(h, p, write_and_read)
                return (h, ck, cv), None
            layers = jnp.arange(cfg.num_layers)
            h, ck, cv = _over_layers(body, (h, cache.k, cache.v), (params, layers),
                                     cfg.scan_layers)
            cache = cache.replace(k=ck, v=cv)
        h = rms_norm(h, self.final_norm[...], eps)
        return h, cache


def abstract_model(config: ModelConfig) -> Phi3ForCausalLM:
    """The model with ShapeDtypeStruct parameters: no memory is allocated."""
    return nnx.eval_shape(lambda: Phi3ForCausalLM(config, rngs=nnx.Rngs(0)))


def param_count(config: ModelConfig) -> int:
    state = nnx.state(abstract_model(config), nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


def init_model(config: ModelConfig, seed: int = 0, mesh=None, rules=None) -> Phi3ForCausalLM:
    """A freshly initialised model, created by one jitted function so that the values do not
    depend on the mesh. With a mesh, every parameter is created directly in its sharding
    (out_shardings from the abstract state): no device ever holds full weights."""
    graphdef, abstract_state = nnx.split(abstract_model(config))

    def make():
        return nnx.state(Phi3ForCausalLM(config, rngs=nnx.Rngs(seed)))

    if mesh is None:
        return nnx.merge(graphdef, jax.jit(make)())
    from phimr_jax.model.sharding import DEFAULT_RULES, state_shardings
    shardings = state_shardings(abstract_state, mesh, rules or DEFAULT_RULES)
    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
