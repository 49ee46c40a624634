"""Per-device memory estimate of a training step, before anything is allocated.

`estimate(model_config, seq_len=..., batch_per_device=..., ...)` returns bytes per device:

- params, grads, optimizer_state: parameter count x dtype bytes, divided over the `devices`
  that shard them (FSDP x tensor; 1 = replicated). Gradients are in the parameter dtype (they
  are gradients of the master weights); AdamW keeps two moments in the parameter dtype
  (optax), SGD none; gradient accumulation adds one more gradient-sized buffer.
- activations: what the backward pass keeps alive for one microbatch of `batch_per_device`
  rows of `seq_len` tokens, counted per token and per layer from the layer's ops
  (phimr_jax/model/phi3.py), by remat policy:
    none  what each layer's backward reads (norm inputs and outputs, rotated q/k, v, the
          attention output and softmax statistics, gate, up and their SwiGLU product);
    dots  the layer input and the matmul outputs the backward reads (q, k, v, gate, up),
          plus one layer's full intermediates while that layer is recomputed;
    full  only each layer's input, plus one layer's full intermediates.
  The reference "xla" attention adds [heads, T, T] float32 scores and compute-dtype probs
  per layer kept (policy none) or for the one layer being recomputed; "blockwise", "splash"
  and "cudnn" keep a float32 log-sum-exp per head, plus four float32 [heads, block, block]
  blocks in the backward (`attention_block_size`; not small when the block is the sequence).
- logits_chunk: the chunked LM head (train/losses.py): float32 [batch, chunk, vocab] logits
  and their gradient for the chunk being differentiated (the exp of the log-sum-exp fuses),
  plus the float32 gradient of the (tied) head that the chunk loop accumulates.

It is a model of the program, not a measurement: tests/train/test_memory.py compares it with
XLA's own buffer assignment (`compiled.memory_analysis()`) on CPU for small models.
"""

from __future__ import annotations

from typing import Optional

from phimr_jax.model.config import ModelConfig, dtype_name
from phimr_jax.model.phi3 import param_count

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KEYS = ("params", "grads", "optimizer_state", "activations", "logits_chunk", "total")


def _layer_activations(cfg: ModelConfig, t: int, c: int, policy: str) -> tuple[float, float]:
    """(bytes kept per token per layer, bytes per token of the one layer being differentiated:
    its recomputed intermediates under remat, and its cotangents)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    hq = cfg.num_heads * cfg.resolved_head_dim
    hkv = cfg.num_kv_heads * cfg.resolved_head_dim
    h = cfg.num_heads
    dense_attn = cfg.attention_impl == "xla"
    # What the backward keeps (model/layers.py saves only the inputs of its hand-written
    # backward passes): each norm's input and output and its f32 inverse RMS (2 x 4 bytes),
    # rotated q and k, v, the attention output, gate and up, and the SwiGLU product that the
    # down projection reads.
    layer = c * (4 * d + 2 * hq + 2 * hkv + 3 * f) + 4 * 2
    # Reference attention: f32 scores + probs kept, f32 d(probs) and d(scores) in the backward;
    # blockwise kernels: the f32 log-sum-exp kept, and four f32 [heads, block, block] blocks
    # (scores, probs, d(probs), d(scores)) live in the backward (per token: / t).
    block = min(cfg.attention_block_size, t)
    attn_keep = (4 + c) * h * t if dense_attn else 4 * h
    attn_grad = 2 * 4 * h * t if dense_attn else 4 * 4 * h * block * block / t
    if policy == "none":
        return layer + attn_keep, layer + attn_grad
    working = layer + attn_keep + attn_grad
    if policy == "dots":  # the layer input and the matmul outputs the backward reads:
        return c * (d + hq + 2 * hkv + 2 * f), working  # q, k, v, gate, up (not o / down)
    return c * d, working  # full remat: the layer input only


def estimate(model_config: ModelConfig, *, seq_len: int, batch_per_device: int,
             devices: int = 1, param_dtype: Optional[str] = None,
             compute_dtype: Optional[str] = None, remat_policy: Optional[str] = None,
             optimizer: str = "adamw", chunk_size: int = 1024,
             grad_accum_steps: int = 1) -> dict:
    """Bytes per device of one training step (see the module docstring): keys params, grads,
    optimizer_state, activations, logits_chunk, total. None dtypes / remat policy: the model
    config's. `devices`: how many devices the parameters shard over (FSDP x tensor)."""
    cfg = model_config
    pdt = dtype_name(param_dtype or cfg.param_dtype)
    cdt = dtype_name(compute_dtype or cfg.dtype)
    policy = remat_policy or cfg.remat_policy
    if policy not in ("none", "dots", "full"):
        raise ValueError(f"remat_policy must be none|dots|full, got {policy!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be adamw|sgd, got {optimizer!r}")
    p, c = _BYTES[pdt], _BYTES[cdt]
    n = param_count(cfg.replace(param_dtype=pdt))
    t, b = int(seq_len), int(batch_per_device)
    tokens = b * t
    params = n * p / devices
    grads = n * p / devices * (2 if grad_accum_steps > 1 else 1)
    opt = 2 * n * p / devices if optimizer == "adamw" else 0.0
    kept, working = _layer_activations(cfg, t, c, policy)
    d = cfg.hidden_size
    # Layers, plus outside them: embedding output, final norm (f32 copy + output), the hidden
    # states the loss reads and their chunked copy.
    activations = tokens * (cfg.num_layers * kept + working + c * d * 3 + 4 * d)
    chunk = min(chunk_size, t)
    head_grad = cfg.vocab_size * d * 4 / devices
    logits = 2 * b * chunk * cfg.vocab_size * 4 + head_grad
    out = {"params": params, "grads": grads, "optimizer_state": opt,
           "activations": activations, "logits_chunk": logits}
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: dict, title: str = "memory per device") -> str:
    """A small table of an `estimate` result in GiB (and MiB for small entries)."""
    def size(n):
        return f"{n / 2**30:9.2f} GiB" if n >= 2**30 else f"{n / 2**20:9.1f} MiB"
    lines = [title] + [f"  {k:<16}{size(est[k])}" for k in KEYS if k in est]
    return "\n".join(lines)


__all__ = ["estimate", "format_estimate", "KEYS"]
