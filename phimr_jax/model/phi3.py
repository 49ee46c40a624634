"""Phi-4-mini (HF `Phi3ForCausalLM`) in Flax NNX.

Layout choices (all exact w.r.t. HF, see tests/model/test_parity.py):
- The decoder layers are stacked ([num_layers, ...] parameters) and run with `lax.scan`, so a
  32-layer model compiles once per layer shape, and remat applies per layer. `scan_layers=False`
  runs the same per-layer function in a Python loop over the same stacked parameters (each
  layer compiled separately): for a few layers it avoids the scan's stacked residual buffers
  (2 CPU cores: the demo model's forward + backward 0.65 -> 0.55 s); checkpoints do not change.
  The per-layer parameter table, the scan/loop and the remat policies are in
  phimr_jax/model/layer_stack.py.
- HF's fused `qkv_proj` / `gate_up_proj` are stored split (q, k, v / gate, up) with separate
  head axes, so tensor parallelism shards whole heads; conversion splits and re-fuses them
  bit-exactly (phimr_jax/model/hf_io.py).
- Packed sequences: `segment_ids` (0 = padding) restrict attention to earlier tokens of the same
  segment; `positions` restart per segment and drive RoPE.
- KV cache (`KVCache`, phimr_jax/model/cache.py): `decode()` writes new keys/values at
  `cache.index` and attends over all filled slots of the same segment. The cache remembers the LongRoPE regime of its keys, one per row: the
  regime is chosen on the first call (HF's rule applied to each row's own positions, i.e. what
  HF picks for that sequence alone, or `long_rope=`) and kept for later steps, so a row never
  mixes short- and long-factor keys. A row crossing `original_max_position_embeddings` with
  short-regime keys therefore keeps the short factors; HF instead drops that sequence's cache
  and re-encodes it with the long factors — the sampler does that re-encode explicitly, per
  row (`needs_reencode`).
- The sampler's single-token loop runs `decode_step` instead of `decode`: the same math on
  per-layer weights prepared once (`step_weights`) and a per-layer cache layout (`StepCache`),
  which took the bench step from 4.6 to ~1.9 ms on CPU (BENCHMARKS.md).
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
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from phimr_jax.model import rope
from phimr_jax.model.attention import dense_mask, make_attention, xla_attention
from phimr_jax.model.cache import KVCache, StepCache
from phimr_jax.model.config import ModelConfig
from phimr_jax.model.flash import MASK_VALUE
from phimr_jax.model.layer_stack import LAYER_PARAM_AXES, _over_layers, _remat, layer_param_shapes
from phimr_jax.model.layers import project, rms_norm, swiglu
from phimr_jax.model.sharding import constrain


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference GQA attention. q [B,T,H,hd], k/v [B,S,K,hd], mask bool [B|1,T,S] (True=keep).

    Query head h reads KV head h // (H // K), like HF's repeat_kv. Scores and softmax in f32.
    (Kept here for callers; the implementation is attention.xla_attention.)
    """
    return xla_attention(q, k, v, mask)


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
        """[batch] bool (cache: a KVCache or StepCache), true for the rows where HF would drop
        the cache of that sequence:
        keys in the short regime while the row's length (its real tokens, including the one
        about to be fed; an int or [batch] ints) exceeds original_max_position_embeddings."""
        if self.config.rope_type != "longrope":
            return jnp.zeros_like(cache.long_rope)
        return (~cache.long_rope) & (next_length > self.config.original_max_position_embeddings)

    def step_weights(self) -> dict:
        """The parameters `decode_step` reads, prepared once per sampling call (outside its
        loop): per-layer arrays (static slices) in the compute dtype, projections as 2-D
        matrices, and the LM head as [hidden, vocab]. Why (measured on the bench model, 2 CPU
        cores, per 8-row step): slicing layer l out of the stacked parameters inside the loop
        copied every weight every step (~1 ms), and the bfloat16 model also re-cast its
        float32 master weights every step. It costs one copy of the weights in the compute
        dtype for the duration of the call. (Tried: q/k/v and gate/up fused into one matmul
        each, 7 -> 4 matmuls per layer: within the run-to-run noise, 1.93 vs 1.94 ms per
        float32 step, so they stay separate and sharded by heads as in training.)"""
        cfg = self.config
        dt = cfg.jnp_dtype
        params = {name: getattr(self, name)[...].astype(dt) for name in LAYER_PARAM_AXES}
        layers = []
        for i in range(cfg.num_layers):
            w = {name: value[i] for name, value in params.items()}
            for name in ("q", "k", "v"):  # [hidden, heads, hd] -> [hidden, heads * hd]
                w[name] = w[name].reshape(w[name].shape[0], -1)
            w["o"] = w["o"].reshape(-1, w["o"].shape[-1])  # [heads * hd, hidden]
            layers.append(w)
        embed = self.embed[...].astype(dt)
        # [hidden, vocab], materialised (the barrier keeps XLA from folding the transpose
        # into the matmul): [8, 256] x [256, 2048] alone 138 us against 197 us (float32);
        # ~0.05 ms of a ~1.9 ms bench step.
        head = jax.lax.optimization_barrier(embed.T) if cfg.tie_word_embeddings else \
            self.lm_head[...].astype(dt)
        return {"layers": layers, "embed": embed, "head": head,
                "final_norm": self.final_norm[...]}

    def decode_step(self, weights: dict, input_ids: jax.Array, cache: StepCache,
                    positions: jax.Array, segment_ids: jax.Array):
        """One token per row on top of `cache`: `decode(input_ids[:, None], ...)` for a cache
        whose regime is already set, in the step layout. input_ids, positions, segment_ids:
        [batch] ints; weights: `step_weights()`. Returns (logits [batch, vocab] float32,
        updated cache). Same math as `_run_layers` (same norms, rotary, float32-accumulated
        projections, reference attention over every cache slot); only the data layout
        differs, so the values agree up to matmul summation order."""
        cfg = self.config
        dt = cfg.jnp_dtype
        h_, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        bsz = input_ids.shape[0]
        eps = cfg.rms_norm_eps
        seg = jax.lax.dynamic_update_slice(cache.segment_ids,
                                           segment_ids.astype(jnp.int32)[:, None],
                                           (0, cache.index))
        mask = dense_mask(1, cache.max_length, segment_ids[:, None], seg, cache.index,
                          cfg.sliding_window)[:, 0]  # [batch, slots], shared by the layers
        cos, sin = rope.cos_sin(cfg, positions[:, None], cache.long_rope, dt)
        x = jnp.take(weights["embed"], input_ids, axis=0)
        x = constrain(x, ("batch", "act_embed"))
        mm = lambda a, w: jnp.einsum("bd,dn->bn", a, w,
                                     preferred_element_type=jnp.float32).astype(dt)
        new_k, new_v = [], []
        for w, ck, cv in zip(weights["layers"], cache.k, cache.v):
            y = rms_norm(x, w["attn_norm"], eps)
            q, k, v = mm(y, w["q"]), mm(y, w["k"]), mm(y, w["v"])
            q = rope.apply_rotary(q.reshape(bsz, 1, h_, hd), cos, sin)
            k = rope.apply_rotary(k.reshape(bsz, 1, kv, hd), cos, sin)
            # The new slot, written in place: keys [batch, kv, hd, 1], values [batch, kv, 1, hd].
            ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 3, 1).astype(ck.dtype),
                                              (0, 0, 0, cache.index))
            cv = jax.lax.dynamic_update_slice(cv, v.reshape(bsz, kv, 1, hd).astype(cv.dtype),
                                              (0, 0, cache.index, 0))
            new_k.append(ck)
            new_v.append(cv)
            # xla_attention for one query, on the step layout (keys [batch, kv, hd, slots],
            # values [batch, kv, slots, hd]). (Tried: the two einsums as float32
            # multiply-and-sum loops; 3x faster alone, no faster inside the step, where the
            # weights and cache streaming from L3 dominate.)
            # The cache is read in its own dtype: a float32 cache of a bfloat16 model (the
            # sampler's choice on CPU, see sampling.cache_dtype) holds bfloat16 values, so
            # these are the bfloat16 products, accumulated in float32, without a per-step
            # cast of the whole cache.
            qg = q.reshape(bsz, kv, h_ // kv, hd).astype(ck.dtype)
            scores = jnp.einsum("bkgd,bkds->bkgs", qg, ck,
                                preferred_element_type=jnp.float32) * (hd ** -0.5)
            scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt).astype(cv.dtype)
            out = jnp.einsum("bkgs,bksd->bkgd", probs, cv,
                             preferred_element_type=jnp.float32).astype(dt).reshape(bsz, h_ * hd)
            x = x + mm(out, w["o"])
            y = rms_norm(x, w["mlp_norm"], eps)
            gate, up = mm(y, w["gate"]), mm(y, w["up"])
            x = constrain(x + mm(swiglu(gate, up), w["down"]), ("batch", "act_embed"))
        x = rms_norm(x, weights["final_norm"], eps)
        logits = jnp.einsum("bd,dv->bv", x, weights["head"], preferred_element_type=jnp.float32)
        cache = cache.replace(k=tuple(new_k), v=tuple(new_v), segment_ids=seg,
                              index=cache.index + 1)
        return logits, cache

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
            q = checkpoint_name(project("btd,dhk->bthk", x, p["q"].astype(dt)), "q")
            k = checkpoint_name(project("btd,dhk->bthk", x, p["k"].astype(dt)), "k")
            v = checkpoint_name(project("btd,dhk->bthk", x, p["v"].astype(dt)), "v")
            q = rope.apply_rotary(q, cos, sin)
            k = rope.apply_rotary(k, cos, sin)
            k, v, extra = kv_fn(k, v)
            out = attn(q, k, v)
            h = h + project("bthk,hkd->btd", out, p["o"].astype(dt))
            x = rms_norm(h, p["mlp_norm"], eps)
            gate = checkpoint_name(project("btd,df->btf", x, p["gate"].astype(dt)), "gate")
            up = checkpoint_name(project("btd,df->btf", x, p["up"].astype(dt)), "up")
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
