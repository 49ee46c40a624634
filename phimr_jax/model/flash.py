"""The blockwise (flash-attention-2 style) kernel behind `attention.blockwise_attention`.

`_flash(q, k, v, ...)` takes block-padded inputs and works in a head-major layout; for each
query block (`lax.map`) a `fori_loop` walks only the key blocks the causal mask and sliding
window can reach (`_kv_range`), with an online softmax. Its custom VJP recomputes the
probabilities block by block from the saved log-sum-exp, walking for each key block only the
query blocks that can see it (`_q_range`). Also holds `MASK_VALUE` (HF's additive mask value,
shared with the reference attention and the decode step) and `_round_up`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # HF's additive mask value.


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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
