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
  largest temporary is one [B, H, block, block] float32 block.
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

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLS = ("xla", "blockwise", "splash", "cudnn")
MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # HF's additive mask value.
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
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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


def _kv_range(i, q_offset, meta):
    """[lo, hi) of the key blocks that query block i can see."""
    kv_len, causal, window, bq, bk = meta
    nk = _round_up(kv_len, bk) // bk
    if not causal:
        return 0, nk
    q_min = q_offset + i * bq
    hi = jnp.clip((q_min + bq - 1) // bk + 1, 0, nk)
    lo = 0 if window is None else jnp.clip((q_min - window + 1) // bk, 0, nk)
    return lo, hi


def _q_range(j, q_offset, nq, meta):
    """[lo, hi) of the query blocks that can see key block j."""
    _, causal, window, bq, bk = meta
    if not causal:
        return 0, nq
    k_min = j * bk
    lo = jnp.clip((k_min - q_offset) // bq, 0, nq)
    hi = nq if window is None else jnp.clip((window + k_min + bk - 2 - q_offset) // bq + 1, 0, nq)
    return lo, hi


def _block_mask(q_idx, k_idx, q_seg, k_seg, g, meta):
    """bool [B, 1, bq * g, bk] for one (query block, key block) pair, rows in the head-major
    layout's order (query position major, the g query heads of a KV head minor)."""
    kv_len, causal, window, _, _ = meta
    m = (k_idx < kv_len)[None, :]
    if causal:
        m = m & (k_idx[None, :] <= q_idx[:, None])
    if window is not None:
        m = m & ((q_idx[:, None] - k_idx[None, :]) < window)
    m = m[None] & (q_seg[:, :, None] == k_seg[:, None, :])  # [B, bq, bk]
    b, bq, bk = m.shape
    return jnp.broadcast_to(m[:, None, :, None, :], (b, 1, bq, g, bk)).reshape(b, 1, bq * g, bk)


def _sl(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


# The kernel works in a head-major layout: queries as [B, K, T * G, hd] (the G query heads of
# each KV head interleaved per position), keys and values as [B, K, S, hd]. A query block is
# then one contiguous [B, K, bq * G, hd] slab and every block matmul a plain (B, K)-batched
# matmul, instead of slicing and re-laying-out [B, T, K, G, hd] blocks in every iteration
# (on 2 CPU cores: forward 18 -> 14 ms, forward + backward 43 -> 35 ms for the demo model's
# 16 x 256-token layer; BENCHMARKS.md).
def _query_rows(x, kvh):
    """Query-shaped [B, T, H, hd] (queries, or their output gradient) -> [B, K, T * G, hd]."""
    b, tp, h, hd = x.shape
    return x.reshape(b, tp, kvh, h // kvh, hd).transpose(0, 2, 1, 3, 4).reshape(
        b, kvh, tp * (h // kvh), hd)


def _heads_major(q, k, v):
    kvh = k.shape[2]
    return (_query_rows(q, kvh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            q.shape[2] // kvh)


def _tokens_major(xh, tp, h):
    """[B, K, T * G, hd] -> [B, T, H, hd]."""
    b, kvh, _, hd = xh.shape
    return xh.reshape(b, kvh, tp, h // kvh, hd).transpose(0, 2, 1, 3, 4).reshape(b, tp, h, hd)


def _flash_fwd_impl(q, k, v, qseg, kvseg, q_offset, meta):
    """(out [B, K, T * G, hd] in q's dtype, lse [B, K, T * G] float32)."""
    _, _, _, bq, bk = meta
    b, tp, h, hd = q.shape
    qh, kh, vh, g = _heads_major(q, k, v)
    kvh, rows, nq = kh.shape[1], bq * g, tp // bq
    scale = hd ** -0.5

    def q_block(i):
        qi, qs = _sl(qh, i * rows, rows, 2), _sl(qseg, i * bq, bq)
        q_idx = q_offset + i * bq + jnp.arange(bq)

        def body(j, carry):
            m, l, acc = carry
            kj, vj, ks = _sl(kh, j * bk, bk, 2), _sl(vh, j * bk, bk, 2), _sl(kvseg, j * bk, bk)
            mask = _block_mask(q_idx, j * bk + jnp.arange(bk), qs, ks, g, meta)
            sc = jnp.einsum("bkmd,bksd->bkms", qi, kj, preferred_element_type=jnp.float32)
            sc = jnp.where(mask, sc * scale, MASK_VALUE)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype), vj,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        m0 = jnp.full((b, kvh, rows), MASK_VALUE, jnp.float32)
        init = (m0, jnp.zeros_like(m0), jnp.zeros((b, kvh, rows, hd), jnp.float32))
        lo, hi = _kv_range(i, q_offset, meta)
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        safe = jnp.where(l > 0, l, 1.0)
        out = (acc / safe[..., None]).astype(q.dtype)  # rows that see nothing give 0
        return out, jnp.where(l > 0, m + jnp.log(safe), 0.0)

    out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, rows, hd], [nq, B, K, rows]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, kvh, tp * g, hd)
    return out, lse.transpose(1, 2, 0, 3).reshape(b, kvh, tp * g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, qseg, kvseg, q_offset, kv_len, causal, window, bq, bk):
    out, _ = _flash_fwd_impl(q, k, v, qseg, kvseg, q_offset, (kv_len, causal, window, bq, bk))
    return _tokens_major(out, q.shape[1], q.shape[2])


def _flash_fwd(q, k, v, qseg, kvseg, q_offset, kv_len, causal, window, bq, bk):
    meta = (kv_len, causal, window, bq, bk)
    out, lse = _flash_fwd_impl(q, k, v, qseg, kvseg, q_offset, meta)
    return (_tokens_major(out, q.shape[1], q.shape[2]),
            (q, k, v, qseg, kvseg, q_offset, out, lse))


def _flash_bwd(kv_len, causal, window, bq, bk, res, dout):
    q, k, v, qseg, kvseg, q_offset, out, lse = res
    meta = (kv_len, causal, window, bq, bk)
    b, tp, h, hd = q.shape
    sp = k.shape[1]
    qh, kh, vh, g = _heads_major(q, k, v)
    kvh, rows = kh.shape[1], bq * g
    nq, nk = tp // bq, sp // bk
    scale = hd ** -0.5
    doh = _query_rows(dout.astype(q.dtype), kvh)
    # D_i = sum_d dO_i * O_i (FlashAttention-2's row term), [B, K, T * G] like lse.
    delta = jnp.einsum("bkmd,bkmd->bkm", doh.astype(jnp.float32), out.astype(jnp.float32))

    # The loop works on transposed scores ([key, query-row] blocks: P^T, dS^T), so that every
    # block matmul has its contraction on a row-major minor or major axis as XLA:CPU's bf16
    # matmul library wants: dV = P^T dO and dK = dS^T Q directly, and dQ^T = K^T dS^T with K^T
    # laid out once per call. The straightforward [query, key] form needs P^T dO (contraction
    # over the major axis of P), which XLA:CPU runs as a float32 fallback matmul ~4x slower.
    k_t = kh.swapaxes(-1, -2)  # [B, K, hd, S]

    def kv_block(dq_t, j):
        kj, vj, ks = _sl(kh, j * bk, bk, 2), _sl(vh, j * bk, bk, 2), _sl(kvseg, j * bk, bk)
        k_tj = _sl(k_t, j * bk, bk, 3)
        k_idx = j * bk + jnp.arange(bk)

        def body(i, carry):
            dk, dv, dq_t = carry
            qi, doi = _sl(qh, i * rows, rows, 2), _sl(doh, i * rows, rows, 2)
            lse_i, d_i = _sl(lse, i * rows, rows, 2), _sl(delta, i * rows, rows, 2)
            mask = _block_mask(q_offset + i * bq + jnp.arange(bq), k_idx,
                               _sl(qseg, i * bq, bq), ks, g, meta).swapaxes(-1, -2)
            sc_t = jnp.einsum("bksd,bkmd->bksm", kj, qi, preferred_element_type=jnp.float32)
            p_t = jnp.where(mask, jnp.exp(sc_t * scale - lse_i[:, :, None, :]), 0.0)
            dp_t = jnp.einsum("bksd,bkmd->bksm", vj, doi, preferred_element_type=jnp.float32)
            ds_t = (p_t * (dp_t - d_i[:, :, None, :]) * scale).astype(q.dtype)
            dv = dv + jnp.einsum("bksm,bkmd->bksd", p_t.astype(q.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bksm,bkmd->bksd", ds_t, qi, preferred_element_type=jnp.float32)
            dqi_t = jnp.einsum("bkds,bksm->bkdm", k_tj, ds_t, preferred_element_type=jnp.float32)
            dq_t = jax.lax.dynamic_update_slice_in_dim(
                dq_t, _sl(dq_t, i * rows, rows, 3) + dqi_t, i * rows, 3)
            return dk, dv, dq_t

        zeros = jnp.zeros((b, kvh, bk, hd), jnp.float32)
        lo, hi = _q_range(j, q_offset, nq, meta)
        dk, dv, dq_t = jax.lax.fori_loop(lo, hi, body, (zeros, zeros, dq_t))
        return dq_t, (dk, dv)

    dq_t0 = jnp.zeros((b, kvh, hd, tp * g), jnp.float32)
    dq_t, (dk, dv) = jax.lax.scan(kv_block, dq_t0, jnp.arange(nk))  # dk, dv: [nk, B, K, bk, hd]
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(b, sp, kvh, hd)
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(b, sp, kvh, hd)
    return (_tokens_major(dq_t.swapaxes(-1, -2), tp, h).astype(q.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


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
