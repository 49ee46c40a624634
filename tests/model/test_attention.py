"""Attention implementations against the XLA reference: blockwise (any backend), splash (its
kernel in the Pallas interpreter here; natively on TPU), cuDNN (GPU only), inside the model too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phimr_jax.model import attention as A
from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import init_model
from phimr_jax.model.sharding import DEFAULT_RULES, axis_rules, make_mesh
from phimr_jax.train import losses


def _qkv(seed, b, t, h, kvh, hd, s=None, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    s = s or t
    return (jnp.asarray(r.normal(size=(b, t, h, hd)), dtype),
            jnp.asarray(r.normal(size=(b, s, kvh, hd)), dtype),
            jnp.asarray(r.normal(size=(b, s, kvh, hd)), dtype))


def _segments(seed, b, t, n=4):
    """Packed rows: sorted segment ids 1..n-1 with trailing padding (0)."""
    r = np.random.default_rng(seed)
    seg = np.sort(r.integers(1, n, size=(b, t)), axis=1)
    seg[:, t - t // 5:] = 0
    return jnp.asarray(seg, jnp.int32)


def _check_fwd_and_grad(fn, ref, q, k, v, tol=1e-5):
    w = jnp.asarray(np.random.default_rng(99).normal(size=q.shape), jnp.float32)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), ref(q, k, v), atol=tol, rtol=tol)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))
    for name, a, b in zip("qkv", grad(fn)(q, k, v), grad(ref)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("t,heads,block_q,block_kv,packed,window", [
    (37, (4, 2), 8, 8, True, None),   # odd length, GQA 2:1, packed rows with padding
    (37, (4, 2), 8, 16, True, 7),     # sliding window, unequal blocks
    (50, (6, 2), 16, 8, True, 12),    # GQA 3:1
    (29, (4, 4), 64, 64, False, None),  # MHA, one block bigger than the sequence
    (45, (4, 1), 16, 16, True, 3),    # MQA, window narrower than a block
])
def test_blockwise_equals_reference(t, heads, block_q, block_kv, packed, window):
    h, kvh = heads
    q, k, v = _qkv(0, 2, t, h, kvh, 16)
    seg = _segments(1, 2, t) if packed else None
    mask = A.dense_mask(t, t, seg, seg, 0, window)
    ref = lambda q, k, v: A.xla_attention(q, k, v, mask)
    fn = lambda q, k, v: A.blockwise_attention(q, k, v, seg, seg, sliding_window=window,
                                               block_q=block_q, block_kv=block_kv)
    _check_fwd_and_grad(fn, ref, q, k, v)


def test_blockwise_non_causal():
    q, k, v = _qkv(2, 2, 21, 4, 2, 8)
    seg = _segments(3, 2, 21)
    mask = seg[:, :, None] == seg[:, None, :]
    fn = lambda q, k, v: A.blockwise_attention(q, k, v, seg, seg, causal=False, block_q=8,
                                               block_kv=4)
    _check_fwd_and_grad(fn, lambda q, k, v: A.xla_attention(q, k, v, mask), q, k, v)


@pytest.mark.parametrize("offset,window", [(0, None), (13, None), (13, 9)])
def test_blockwise_with_query_offset(offset, window):
    """Decode-style: T queries at cache slots offset.. over an S-slot cache with empty slots."""
    t, s = 11, 40
    q, k, v = _qkv(4, 2, t, 4, 2, 16, s=s)
    kv_seg = np.ones((2, s), np.int32)
    kv_seg[1, :5] = 0  # left padding in row 1
    kv_seg[:, offset + t:] = 0  # empty tail of the cache
    kv_seg = jnp.asarray(kv_seg)
    q_seg = jax.lax.dynamic_slice_in_dim(kv_seg, offset, t, axis=1)
    off = jnp.asarray(offset)  # traced, as in decode
    mask = A.dense_mask(t, s, q_seg, kv_seg, off, window)
    fn = lambda q, k, v: A.blockwise_attention(q, k, v, q_seg, kv_seg, q_offset=off,
                                               sliding_window=window, block_q=4, block_kv=8)
    _check_fwd_and_grad(fn, lambda q, k, v: A.xla_attention(q, k, v, mask), q, k, v)


def test_blockwise_bf16_close_to_reference():
    q, k, v = _qkv(5, 1, 64, 4, 2, 32, dtype=jnp.bfloat16)
    mask = A.dense_mask(64, 64)
    got = A.blockwise_attention(q, k, v, block_q=16, block_kv=16)
    assert got.dtype == jnp.bfloat16
    ref = A.xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=3e-2)


def test_blockwise_never_materialises_scores():
    """Forward + backward at T=2048: no [T, T] array in the compiled program, and far less
    scratch memory than the reference (which holds [B, H, T, T] float32 scores/probs)."""
    t, h, kvh, hd = 2048, 4, 2, 16
    q, k, v = _qkv(6, 1, t, h, kvh, hd)
    seg = jnp.ones((1, t), jnp.int32)

    def compiled(attn):
        loss = lambda q, k, v: jnp.sum(attn(q, k, v) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()

    bw = compiled(lambda q, k, v: A.blockwise_attention(q, k, v, seg, seg, block_q=256,
                                                        block_kv=256))
    mask = A.dense_mask(t, t, seg, seg)
    ref = compiled(lambda q, k, v: A.xla_attention(q, k, v, mask))
    assert f"{t},{t}]" not in bw.as_text()
    scores_bytes = h * t * t * 4
    assert bw.memory_analysis().temp_size_in_bytes < scores_bytes / 8
    assert ref.memory_analysis().temp_size_in_bytes > scores_bytes


# ------------------------------------------------------------------ inside the model
def _model(impl, **kw):
    cfg = mc.tiny(initializer_range=0.125, attention_impl=impl, attention_block_size=8, **kw)
    return init_model(cfg, seed=0)


def _packed_batch(t=45):
    r = np.random.default_rng(7)
    ids = r.integers(4, 512, size=(2, t + 1)).astype(np.int32)
    seg = np.asarray(_segments(8, 2, t))
    pos = np.zeros_like(seg)
    for row in range(2):
        for s_id in np.unique(seg[row]):
            where = seg[row] == s_id
            pos[row, where] = np.arange(where.sum())
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": pos, "segment_ids": seg,
            "loss_mask": (seg > 0).astype(np.float32)}


@pytest.mark.parametrize("window", [None, 6])
def test_model_blockwise_equals_xla(window):
    batch = _packed_batch()
    ref, bw = _model("xla", sliding_window=window), _model("blockwise", sliding_window=window)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    a, b = np.asarray(ref(*args)), np.asarray(bw(*args))
    assert a.std() > 0.5
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bw(batch["inputs"])), np.asarray(ref(batch["inputs"])),
                               atol=1e-5, rtol=1e-5)


def _grads(model, batch):
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(p):
        total, weight, _ = losses.cross_entropy(nnx.merge(graphdef, p), batch, chunk_size=16)
        return total / weight
    return jax.jit(jax.grad(loss))(nnx.to_pure_dict(state))


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_model_blockwise_gradients_equal_xla(remat):
    batch = _packed_batch()
    ref = _grads(_model("xla"), batch)
    got = _grads(_model("blockwise", remat_policy=remat), batch)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("window", [None, 6])
def test_decode_with_blockwise_prefill_matches_full_forward(window):
    """Left-padded ragged prefill through the blockwise kernel (traced cache offset), then
    reference single-token steps, equal the full forward of each unpadded row."""
    model = _model("blockwise", sliding_window=window)
    ref_model = _model("xla", sliding_window=window)
    r = np.random.default_rng(9)
    a, b = r.integers(4, 512, size=(1, 19)), r.integers(4, 512, size=(1, 10))
    pad = 19 - 10
    ids = np.concatenate([a, np.concatenate([np.zeros((1, pad), int), b], axis=1)])
    seg = np.stack([np.ones(19), np.r_[[0] * pad + [1] * 10]]).astype(np.int32)
    pos = np.stack([np.arange(19), np.maximum(np.arange(19) - pad, 0)]).astype(np.int32)
    cache = model.init_cache(2, 40)
    logits, cache = jax.jit(lambda m, x, c: m.decode(x, c, positions=pos, segment_ids=seg))(
        model, ids, cache)
    nxt = r.integers(4, 512, size=(2, 6))
    steps = []
    for i in range(6):
        p = np.array([[19 + i], [10 + i]], np.int32)
        out, cache = model.decode(nxt[:, i:i + 1], cache, positions=p)
        steps.append(np.asarray(out))
    # A second multi-token call at a non-zero cache offset also goes through blockwise.
    more, _ = model.decode(nxt[:, :3], cache, positions=np.array([[25, 26, 27], [16, 17, 18]]))
    for row, seq in ((0, a), (1, b)):
        full = np.concatenate([seq, nxt[row:row + 1], nxt[row:row + 1, :3]], axis=1)
        ref = np.asarray(ref_model(full, long_rope=False))[0]
        n = seq.shape[1]
        np.testing.assert_allclose(np.asarray(logits)[row, -n:], ref[:n], atol=1e-4)
        np.testing.assert_allclose(np.concatenate(steps, 1)[row], ref[n:n + 6], atol=1e-4)
        np.testing.assert_allclose(np.asarray(more)[row], ref[n + 6:], atol=1e-4)


# ------------------------------------------------------------------ dispatch and fallbacks
def test_config_fields_round_trip_and_validate():
    cfg = mc.tiny(attention_impl="blockwise", attention_block_size=256)
    assert mc.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "attention_impl" not in cfg.to_hf_dict()
    with pytest.raises(mc.ConfigError, match="attention_impl"):
        mc.tiny(attention_impl="flash")
    with pytest.raises(mc.ConfigError, match="attention_block_size"):
        mc.tiny(attention_block_size=0)


def test_fallbacks_are_explicit(monkeypatch):
    bf16 = jnp.bfloat16
    if jax.default_backend() == "cpu":
        assert A.resolve_impl("splash", segmented=True, dtype=bf16) == "blockwise"
        assert A.resolve_impl("cudnn", segmented=False, dtype=bf16) == "blockwise"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    # cuDNN's public API has no segment ids: packed rows must not go to it.
    assert A.resolve_impl("cudnn", segmented=True, dtype=bf16) == "blockwise"
    assert A.resolve_impl("cudnn", segmented=False, dtype=jnp.float32) == "blockwise"
    assert A.resolve_impl("cudnn", segmented=False, dtype=bf16) == "cudnn"
    assert A.resolve_impl("cudnn", segmented=False, dtype=bf16,
                          self_attention=False) == "blockwise"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "tpu")
    assert A.resolve_impl("splash", segmented=True, dtype=bf16) == "splash"
    assert A.resolve_impl("splash", segmented=True, dtype=bf16,
                          self_attention=False) == "blockwise"


# ------------------------------------------------------------------ splash
def test_splash_kernel_in_interpreter_equals_reference():
    """The splash wrapper (padding to 128-multiples, GQA via vmapped MQA kernels, segment ids,
    local mask) run through the Pallas interpreter, so its logic is checked without a TPU."""
    t, window = 150, 40
    q, k, v = _qkv(10, 1, t, 4, 2, 16)
    seg = _segments(11, 1, t)
    mask = A.dense_mask(t, t, seg, seg, 0, window)
    fn = lambda q, k, v: A.splash_attention(q, k, v, seg, seg, sliding_window=window,
                                            block_size=128, interpret=True)
    _check_fwd_and_grad(fn, lambda q, k, v: A.xla_attention(q, k, v, mask), q, k, v, tol=2e-5)


def test_splash_under_a_mesh_in_interpreter():
    """shard_map over batch (fsdp) and KV heads (tensor) on fake CPU devices."""
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    t = 130
    q, k, v = _qkv(12, 2, t, 4, 2, 16)
    seg = _segments(13, 2, t)
    mask = A.dense_mask(t, t, seg, seg)
    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        got = jax.jit(lambda q, k, v: A.splash_attention(q, k, v, seg, seg, block_size=128,
                                                         interpret=True))(q, k, v)
    np.testing.assert_allclose(got, A.xla_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash attention needs a TPU")
def test_model_splash_on_tpu():
    batch = _packed_batch(300)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=128, short_factor=(1.0,) * 48,
              long_factor=(1.0,) * 48)
    ref = init_model(mc.tiny(attention_impl="xla", **kw), seed=0)
    got = init_model(mc.tiny(attention_impl="splash", attention_block_size=128, **kw), seed=0)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(np.asarray(got(*args)), np.asarray(ref(*args)), atol=2e-3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_on_gpu_equals_reference():
    q, k, v = _qkv(14, 2, 256, 8, 2, 64, dtype=jnp.bfloat16)
    got = A.cudnn_attention(q, k, v, sliding_window=100).astype(jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = A.xla_attention(*f32, A.dense_mask(256, 256, sliding_window=100))
    np.testing.assert_allclose(got, ref, atol=3e-2)


def test_model_blockwise_sharded_equals_unsharded():
    """Blockwise attention inside the trainer's setting: params and batch sharded over an
    (fsdp 4, tensor 2) mesh of fake devices, loss and gradients as on one device."""
    from phimr_jax.model.sharding import state_shardings

    batch = _packed_batch(32)
    batch = {k: np.concatenate([v] * 2) for k, v in batch.items()}  # 4 rows over fsdp 4
    model = _model("blockwise")
    want = _grads(model, batch)
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
        got = _grads(sharded, batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
