"""The trainer's model and sharded state: the initial model of a run (`_init_model`: from
`init.checkpoint`, `init.hf_dir` or a fresh preset) and its dtype/remat policy
(`with_model_config`), the shardings of the optimizer state (`_opt_shardings`, mirroring the
parameters) and of batches (`_batch_sharding`), and per-process / replicated host batches as
global arrays sharded over the batch axes (`_global_batch`, `replicated_batch`)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from phimr_jax.model import sharding
from phimr_jax.model.config import preset
from phimr_jax.model.hf_io import load_hf
from phimr_jax.model.phi3 import Phi3ForCausalLM, abstract_model, init_model
from phimr_jax.train import checkpointing


def with_model_config(model: Phi3ForCausalLM, **changes) -> Phi3ForCausalLM:
    """The same parameters under a model config with changed dtype policy / remat."""
    cfg = model.config.replace(**changes).validate()
    params = nnx.state(model, nnx.Param)
    if cfg.param_dtype != model.config.param_dtype:
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.jnp_param_dtype), p))(params)
    return nnx.merge(nnx.graphdef(abstract_model(cfg)), params)


def _init_model(config: ConfigDict, mesh, rules) -> tuple[Phi3ForCausalLM, str, str]:
    """(model, tokenizer_dir it comes with, description) from init.checkpoint / hf_dir / preset."""
    pdt = config.model.param_dtype
    if config.init.checkpoint:
        model, info, step = checkpointing.restore_model(config.init.checkpoint, None, mesh, rules)
        return model, info.get("tokenizer_dir", ""), f"run {config.init.checkpoint} step {step}"
    if config.init.hf_dir:
        model = load_hf(config.init.hf_dir, dtype=pdt, mesh=mesh, rules=rules)
        return model, config.init.hf_dir, f"HF {config.init.hf_dir}"
    overrides = dict(config.model.overrides) if config.model.get("overrides") else {}
    cfg = preset(config.model.preset, param_dtype=pdt, **overrides)
    return init_model(cfg, seed=config.seed, mesh=mesh, rules=rules), "", \
        f"fresh {config.model.preset}"


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_shardings(abstract_opt, params_sh, params, mesh):
    """Optimizer leaves mirroring a parameter (Adam mu/nu) share its sharding; scalars are
    replicated. Parameters are nested dicts, so a parameter's dict-key path is a suffix of the
    dict-key path of the optimizer leaves that mirror it."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {_dict_keys(p): (s, leaf.shape) for (p, s), (_, leaf) in zip(
        jax.tree_util.tree_flatten_with_path(params_sh)[0],
        jax.tree_util.tree_flatten_with_path(params)[0])}

    def one(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated
    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def _batch_sharding(shape, mesh, rules) -> NamedSharding:
    """Batch arrays ([rows], [rows, length], ...): rows over the batch axes."""
    axes = ("batch", "length")[:len(shape)] + (None,) * max(len(shape) - 2, 0)
    return NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh, rules))


def _global_batch(local: dict, mesh, rules) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(
            _batch_sharding(global_shape, mesh, rules), v, global_shape)
    return out


def replicated_batch(x: np.ndarray):
    """A host array that every process holds in full -> a global array sharded over the batch
    axes (for evaluation / scoring passes outside the training step)."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return x
    return jax.make_array_from_callback(
        x.shape, _batch_sharding(x.shape, mesh, sharding.current_rules()), lambda i: x[i])
