"""The decoder's stacked layers: the per-layer parameters' logical axes and shapes (every
one stored with a leading [num_layers] axis), running a per-layer body over that axis
(`lax.scan` or a Python loop, `ModelConfig.scan_layers`) and the remat policies applied to it
(`ModelConfig.remat_policy`)."""

from __future__ import annotations

import jax

from phimr_jax.model.config import ModelConfig


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


def _over_layers(body, carry, xs, scan: bool):
    """`lax.scan(body, carry, xs)` over the leading (layer) axis of xs, or the same body in a
    Python loop (outputs of body are not collected: the decoder's are None)."""
    if scan:
        return jax.lax.scan(body, carry, xs)[0]
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        carry, _ = body(carry, jax.tree.map(lambda a: a[i], xs))
    return carry


_SAVED_BY_DOTS = ("q", "k", "v", "gate", "up")


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    # "dots": keep the q/k/v and gate/up projections (named in `block`, phi3.py), recompute
    # the rest. Named rather than found by primitive: the projections are custom-VJP functions
    # (model/layers.py) whose outputs are casts of dots, which a dots policy does not see.
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*_SAVED_BY_DOTS))
