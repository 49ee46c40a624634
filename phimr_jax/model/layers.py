"""RMSNorm and the SwiGLU activation with hand-written backward passes.

The forward passes are HF's (`Phi3RMSNorm`, `silu(gate) * up`), value for value. The backward
passes compute exactly the derivatives autodiff would, but each in one elementwise pass over
[tokens, features] in the natural layout, behind an optimisation barrier. Why: with autodiff,
XLA fuses the SwiGLU derivative into the transpose its weight-gradient matmul wants and writes
it column by column ([mlp, tokens]), and it folds the RMSNorm weight gradient into a fusion that
recomputes the normalisation per reduced element. On the demo model (2 CPU cores) those two
fusions cost about a third of a training step's op time (measured with jax.profiler; see
BENCHMARKS.md). The barrier costs nothing on accelerators: the tensors it pins are the ones the
backward pass needs anyway.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _rms_norm_and_inv(x, weight, eps):
    """(HF Phi3RMSNorm output, the float32 inverse RMS the backward pass reuses)."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * (x32 * inv).astype(x.dtype), inv


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, eps):
    return _rms_norm_and_inv(x, weight, eps)[0]


def _rms_norm_fwd(x, weight, eps):
    y, inv = _rms_norm_and_inv(x, weight, eps)
    return y, (x, weight, inv)


def _rms_norm_bwd(eps, res, dy):
    x, weight, inv = res
    x32 = x.astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)
    normed = x32 * inv
    # d/dweight: sum over every token of dy * normalised x (the cast to x.dtype is the identity
    # in float32; in bfloat16 autodiff passes the gradient straight through it as well).
    dweight = jnp.sum((dy32 * normed).reshape(-1, x.shape[-1]), axis=0)
    # d/dx of x * rsqrt(mean(x^2) + eps), with g = dy * weight.
    g = dy32 * weight.astype(jnp.float32)
    dx = inv * (g - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    dx, dweight = jax.lax.optimization_barrier((dx, dweight))
    return dx.astype(x.dtype), dweight.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF Phi3RMSNorm: float32 math, cast back to the input dtype, then times the weight."""
    return _rms_norm(x, weight, eps)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, the Phi3 MLP activation."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, d):
    gate, up = res
    g32 = gate.astype(jnp.float32)
    d32 = d.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    dgate = d32 * up.astype(jnp.float32) * sig * (1 + g32 * (1 - sig))
    dup = d32 * g32 * sig
    dgate, dup = jax.lax.optimization_barrier((dgate.astype(gate.dtype), dup.astype(up.dtype)))
    return dgate, dup


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

__all__ = ["rms_norm", "swiglu"]


def _grad_specs(spec: str) -> tuple[str, str]:
    """Einsum specs of the two input gradients of `spec` ("A,B->C"): dA = "C,B->A",
    dB = "A,C->B". Valid when every index of A and B appears in C or in the other operand (no
    single-operand reductions), as in every projection of the model."""
    ins, out = spec.split("->")
    a, b = ins.split(",")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) accumulated in float32 and returned in x's dtype, with every
    backward matmul likewise taking its inputs in the compute dtype and accumulating in float32.
    Plain autodiff of a float32-accumulating einsum would run the backward matmuls on float32
    cotangents; bfloat16 x float32 matmuls take the slow mixed path on CPU (and the matrix units
    of accelerators want both inputs in bfloat16)."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _project_fwd(spec, x, w):
    return project(spec, x, w), (x, w)


def _project_bwd(spec, res, dy):
    x, w = res
    dx_spec, dw_spec = _grad_specs(spec)
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(dx_spec, dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(dw_spec, x, dy, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


project.defvjp(_project_fwd, _project_bwd)
