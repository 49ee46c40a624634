"""The hand-written backward passes of model/layers.py against autodiff of the plain maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phimr_jax.model.layers import project, rms_norm, swiglu


def _plain_rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def _plain_project(spec, x, w):
    return jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)


def _vjp(f, args, ct):
    out, pull = jax.vjp(f, *args)
    return out, pull(ct.astype(out.dtype))


def _close(a, b, tol):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    scale = max(float(np.max(np.abs(b))), 1e-6)
    assert float(np.max(np.abs(a - b))) <= tol * scale, (np.max(np.abs(a - b)), scale)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_matches_autodiff(dtype, tol):
    k = jax.random.split(jax.random.key(0), 3)
    x = (3 * jax.random.normal(k[0], (2, 5, 48)) + 0.5).astype(dtype)
    w = 1 + 0.3 * jax.random.normal(k[1], (48,))
    ct = jax.random.normal(k[2], (2, 5, 48))
    out, (dx, dw) = _vjp(lambda x, w: rms_norm(x, w, 1e-5), (x, w), ct)
    ref, (rdx, rdw) = _vjp(lambda x, w: _plain_rms_norm(x, w, 1e-5), (x, w), ct)
    assert out.dtype == ref.dtype == dtype and dx.dtype == dtype and dw.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    _close(dx, rdx, tol)
    _close(dw, rdw, tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_swiglu_matches_autodiff(dtype, tol):
    k = jax.random.split(jax.random.key(1), 3)
    g = (4 * jax.random.normal(k[0], (3, 7, 32))).astype(dtype)
    u = jax.random.normal(k[1], (3, 7, 32)).astype(dtype)
    ct = jax.random.normal(k[2], (3, 7, 32))
    out, grads = _vjp(swiglu, (g, u), ct)
    ref, rgrads = _vjp(lambda g, u: jax.nn.silu(g) * u, (g, u), ct)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    for a, b in zip(grads, rgrads):
        assert a.dtype == dtype
        _close(a, b, tol)


@pytest.mark.parametrize("spec,xs,ws", [
    ("btd,dhk->bthk", (2, 6, 16), (16, 4, 8)),
    ("bthk,hkd->btd", (2, 6, 4, 8), (4, 8, 16)),
    ("btd,df->btf", (2, 6, 16), (16, 24)),
])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_project_matches_autodiff(spec, xs, ws, dtype, tol):
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], xs).astype(dtype)
    w = jax.random.normal(k[1], ws).astype(dtype)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    ct = jax.random.normal(k[2], out_shape)
    out, (dx, dw) = _vjp(lambda x, w: project(spec, x, w), (x, w), ct)
    ref, (rdx, rdw) = _vjp(lambda x, w: _plain_project(spec, x, w), (x, w), ct)
    assert out.dtype == dx.dtype == dw.dtype == dtype
    _close(out, ref, tol)
    _close(dx, rdx, tol)
    _close(dw, rdw, tol)


def test_project_backward_matmuls_take_compute_dtype_inputs():
    """In bfloat16 no backward matmul runs on a float32 operand (the slow mixed path)."""
    x = jnp.ones((2, 6, 16), jnp.bfloat16)
    w = jnp.ones((16, 24), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(project("btd,df->btf", x, w).astype(jnp.float32)),
                         argnums=(0, 1)))
    hlo = f.lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
    assert len(dots) == 2, dots  # dx and dw (the forward's output is unused by grad)
    for line in dots:
        operand_types = line.split(" : (")[1].split(") ->")[0]
        assert "bf16" in operand_types and "f32" not in operand_types, line
