"""Attention implementations, chosen by `ModelConfig.attention_impl`.

Every implementation computes the same thing: causal GQA attention (query head h reads KV head
h // (H // K), like HF's repeat_kv), restricted to keys of the same segment (packed rows;
segment 0 is padding and attends only to padding) and, when the model has one, to a sliding
window (key index > query index - window, HF semantics). Scores and softmax run in float32.

- "xla" (default): `xla_attention`, the reference. Materialises [B, H, T, S] float32 scores.
- "blockwise": `blockwise_attention`, flash-attention-2 style in pure JAX, on every backend.
  Queries are split into blocks (`lax.map`); for each query block a `fori_loop` walks only the
  key blocks that the causal mask and the sliding window can reach, with an online softmax
  (running max, running sum). A custom VJP recomputes the probabilities block by block in the
  backward pass from the saved log-sum-exp, so neither pass ever holds a [T, S] array: the
  largest temporary is one [B, H, block, block] float32 block. The kernel itself (forward,
  backward, block ranges and masks) is in phimr_jax/model/flash.py.
- "splash": TPU only, `jax.experimental.pallas.ops.tpu.splash_attention` (segment ids, causal
  or local mask, GQA through its MQA kernel vmapped over KV heads; shard_map'ped over the batch
  and KV-head mesh axes when a mesh is active). Other backends fall back to "blockwise".
- "cudnn": GPU only, `jax.nn.dot_product_attention(implementation="cudnn")`. Its public API
  has causal masking, padding lengths and a left window, but NO segment ids (jax 0.10.2): a
  packed row would silently attend across documents (MaxText's cuDNN path has that bug). So
  "cudnn" is used only without segment ids and in bf16/f16 (cuDNN's dtypes); packed rows,
  float32, and non-GPU backends fall back to "blockwise". Never silently wrong, only slower.

KV-cache decoding (`Phi3ForCausalLM.decode`): a multi-token call (the prefill) uses the
blockwise kernel whenever `attention_impl != "xla"` (it supports a traced query offset, i.e.
queries at cache slots index..index+T-1 over the whole cache, and skips the empty cache tail);
single-token steps keep the reference path, whose [B, H, 1, S] scores are small.
"""

from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp

from phimr_jax.model.flash import MASK_VALUE, _flash, _round_up

log = logging.getLogger(__name__)

IMPLS = ("xla", "blockwise", "splash", "cudnn")
_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


# ------------------------------------------------------------------------- reference
def dense_mask(t: int, s: int, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
               sliding_window: Optional[int] = None) -> jax.Array:
    """bool [B|1, T, S] (True = attend): query i (at slot q_offset + i) sees key j iff
    j <= q_offset + i, q_offset + i - j < window, and the segments are equal."""
    q_idx = q_offset + jnp.arange(t)
    k_idx = jnp.arange(s)
    mask = (k_idx[None, :] <= q_idx[:, None])[None]
    if sliding_window is not None:
        mask = mask & ((q_idx[:, None] - k_idx[None, :]) < sliding_window)[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference GQA attention. q [B,T,H,hd], k/v [B,S,K,hd], mask bool [B|1,T,S] (True=keep)."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


# ------------------------------------------------------------------------- blockwise
def blockwise_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, q_offset=0,
                        causal: bool = True, sliding_window: Optional[int] = None,
                        block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """Memory-efficient attention, same result as `xla_attention` with `dense_mask(...)`.

    q [B,T,H,hd], k/v [B,S,K,hd]; segment ids [B,T] / [B,S] ints or None (one segment);
    q_offset: slot of the first query (int or traced scalar; decode); causal=False attends to
    every key of the same segment (no window then). Lengths need not be block multiples.
    """
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    if sliding_window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, t), jnp.int32)
        kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    bq, bk = min(block_q, t), min(block_kv, s)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    pad3 = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    out = _flash(pad3(q, tp), pad3(k, sp), pad3(v, sp),
                 pad3(jnp.asarray(q_segment_ids, jnp.int32), tp),
                 pad3(jnp.asarray(kv_segment_ids, jnp.int32), sp),
                 jnp.asarray(q_offset, jnp.int32), s, causal, sliding_window, bq, bk)
    return out[:, :t]


# ------------------------------------------------------------------------- splash (TPU)
def splash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *,
                     sliding_window: Optional[int] = None, block_size: int = 512,
                     interpret: bool = False) -> jax.Array:
    """Causal self-attention (T == S) with the Pallas TPU splash kernel. `interpret=True` runs
    the kernel in the Pallas interpreter (any backend, slow: tests only)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    from phimr_jax.model.sharding import MESH_AXES, _RULES, DEFAULT_RULES, logical_to_spec

    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    blk = max(128, min(block_size, _round_up(t, 128)) // 128 * 128)  # splash wants 128 multiples
    tp = _round_up(t, blk)
    if q_segment_ids is None:
        q_segment_ids = kv_segment_ids = jnp.ones((b, t), jnp.int32)
    # Padded slots get segment -1: no real query sees them; they see only themselves.
    seg_pad = lambda s: jnp.pad(jnp.asarray(s, jnp.int32), ((0, 0), (0, tp - t)),
                                constant_values=-1)
    qseg, kvseg = seg_pad(q_segment_ids), seg_pad(kv_segment_ids)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    qh = (pad(q) * jnp.asarray(hd ** -0.5, q.dtype)).reshape(b, tp, kvh, g, hd)
    qh = qh.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    kh, vh = pad(k).transpose(0, 2, 1, 3), pad(v).transpose(0, 2, 1, 3)  # [B, K, T, hd]
    if sliding_window is not None and sliding_window < tp:
        one = sa.LocalMask((tp, tp), window_size=(sliding_window - 1, 0), offset=0)
    else:
        one = sa.CausalMask((tp, tp))
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * g), block_sizes=sizes,
                                              interpret=interpret)

    def per_device(qh, kh, vh, qseg, kvseg):
        def row(qr, kr, vr, qs, ks):
            seg = sa.SegmentIds(q=qs, kv=ks)
            return jax.vmap(lambda a, c, d: kernel(a, c, d, segment_ids=seg))(qr, kr, vr)
        return jax.vmap(row)(qh, kh, vh, qseg, kvseg)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names):
        rules = _RULES.get() or DEFAULT_RULES
        spec = lambda axes, x: logical_to_spec(axes, x.shape, mesh, rules)
        q_spec = spec(("batch", "kv_heads"), qh)
        kv_spec = spec(("batch", "kv_heads"), kh)
        seg_spec = spec(("batch",), qseg)
        per_device = jax.shard_map(per_device, mesh=mesh, out_specs=q_spec, check_vma=False,
                                   in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec))
    out = per_device(qh, kh, vh, qseg, kvseg)  # [B, K, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, hd)[:, :t]


# ------------------------------------------------------------------------- cuDNN (GPU)
def cudnn_attention(q, k, v, *, sliding_window: Optional[int] = None) -> jax.Array:
    """Causal self-attention without segment ids through cuDNN flash attention (GPU, bf16/f16).
    Callers must not use it for packed rows: the public API cannot express segment ids."""
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        implementation="cudnn")


# ------------------------------------------------------------------------- dispatch
def resolve_impl(impl: str, *, segmented: bool, dtype, self_attention: bool = True) -> str:
    """The implementation that will really run: `impl`, or "blockwise" where `impl` cannot be
    used here (wrong backend; splash/cuDNN in decode; cuDNN with segment ids or float32)."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    why = None
    if impl == "splash":
        if backend != "tpu":
            why = f"backend {backend}, not tpu"
        elif not self_attention:
            why = "KV-cache decoding"
    elif impl == "cudnn":
        if backend != "gpu":
            why = f"backend {backend}, not gpu"
        elif segmented:
            why = "segment ids (packed rows): jax.nn.dot_product_attention cannot take them"
        elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            why = f"dtype {jnp.dtype(dtype).name}; cuDNN flash attention takes bf16/f16"
        elif not self_attention:
            why = "KV-cache decoding"
    if why:
        _warn_once(f"attention_impl {impl!r} not used ({why}); using 'blockwise'")
        return "blockwise"
    return impl


def make_attention(impl: str, *, t: int, s: int, q_segment_ids=None, kv_segment_ids=None,
                   q_offset=None, sliding_window: Optional[int] = None, block_size: int = 512,
                   dtype=jnp.float32):
    """A function (q, k, v) -> out for one forward pass: the mask (or what replaces it) is
    built once here and shared by every layer. q_offset: None for self-attention (queries and
    keys are the same T == S tokens), or the traced cache slot of the first query (decode)."""
    self_attention = q_offset is None
    if self_attention and sliding_window is not None and sliding_window >= s:
        sliding_window = None  # cannot bite: every earlier key is inside the window
    impl = resolve_impl(impl, segmented=q_segment_ids is not None, dtype=dtype,
                        self_attention=self_attention)
    offset = 0 if self_attention else q_offset
    if impl == "xla":
        mask = dense_mask(t, s, q_segment_ids, kv_segment_ids, offset, sliding_window)
        return lambda q, k, v: xla_attention(q, k, v, mask)
    if impl == "splash":
        return lambda q, k, v: splash_attention(q, k, v, q_segment_ids, kv_segment_ids,
                                                sliding_window=sliding_window,
                                                block_size=block_size)
    if impl == "cudnn":
        return lambda q, k, v: cudnn_attention(q, k, v, sliding_window=sliding_window)
    return lambda q, k, v: blockwise_attention(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset=offset, sliding_window=sliding_window,
        block_q=block_size, block_kv=block_size)


__all__ = ["IMPLS", "dense_mask", "xla_attention", "blockwise_attention", "splash_attention",
           "cudnn_attention", "resolve_impl", "make_attention"]
