"""Hugging Face safetensors <-> phimr_jax weights, both ways, bit-exact.

`load_hf` reads `config.json` and `model.safetensors` (or the sharded files listed by
`model.safetensors.index.json`), safetensors only. It never holds the checkpoint in memory:
each device shard of each parameter is read straight from the file with `get_slice` (only the
rows and columns that shard needs) and placed on its device, optionally into a target sharding.

`save_hf` writes `config.json`, `generation_config.json` and safetensors files (split with an
index above `max_shard_size`), one layer of one tensor gathered to the host at a time.

Layout map (torch Linear weights are [out, in]; our kernels are [in, ...out]):
  model.embed_tokens.weight [V, D]          -> embed [V, D]
  layers.{l}.input_layernorm.weight [D]      -> attn_norm[l]
  layers.{l}.self_attn.qkv_proj.weight       -> q[l] [D, H, hd], k[l], v[l] [D, K, hd]
      rows: Q (H*hd) then K (K*hd) then V (K*hd), heads in contiguous hd-row blocks
  layers.{l}.self_attn.o_proj.weight [D, H*hd] -> o[l] [H, hd, D]
  layers.{l}.post_attention_layernorm.weight -> mlp_norm[l]
  layers.{l}.mlp.gate_up_proj.weight [2F, D] -> gate[l] [D, F] (first half), up[l] (second)
  layers.{l}.mlp.down_proj.weight [D, F]     -> down[l] [F, D]
  model.norm.weight [D]                      -> final_norm
  lm_head.weight [V, D] (untied models only) -> lm_head [D, V]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phimr_jax.model.config import ConfigError, ModelConfig, dtype_name, read_json
from phimr_jax.model.phi3 import Phi3ForCausalLM, abstract_model
from phimr_jax.model.sharding import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default for save_pretrained.


class CheckpointError(ValueError):
    """An HF checkpoint directory that cannot be loaded (message says which file/tensor)."""


@dataclasses.dataclass(frozen=True)
class _Source:
    """How one of our parameters (one layer of it, if stacked) is cut out of an HF tensor."""

    name: str  # HF tensor name; "{l}" is replaced by the layer index.
    kind: str  # "copy", "T" (transpose), "heads_in" ([rows=n*hd, D] -> [D, n, hd]),
    #            "heads_out" ([D, n*hd] -> [n, hd, D])
    row_offset: int = 0  # First row of this block in a fused tensor.
    stacked: bool = False


def _sources(cfg: ModelConfig) -> dict:
    h, k, hd, f = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.intermediate_size
    pre = "model.layers.{l}."
    src = {
        "embed": _Source("model.embed_tokens.weight", "copy"),
        "attn_norm": _Source(pre + "input_layernorm.weight", "copy", stacked=True),
        "q": _Source(pre + "self_attn.qkv_proj.weight", "heads_in", 0, True),
        "k": _Source(pre + "self_attn.qkv_proj.weight", "heads_in", h * hd, True),
        "v": _Source(pre + "self_attn.qkv_proj.weight", "heads_in", (h + k) * hd, True),
        "o": _Source(pre + "self_attn.o_proj.weight", "heads_out", 0, True),
        "mlp_norm": _Source(pre + "post_attention_layernorm.weight", "copy", stacked=True),
        "gate": _Source(pre + "mlp.gate_up_proj.weight", "T", 0, True),
        "up": _Source(pre + "mlp.gate_up_proj.weight", "T", f, True),
        "down": _Source(pre + "mlp.down_proj.weight", "T", 0, True),
        "final_norm": _Source("model.norm.weight", "copy"),
    }
    if not cfg.tie_word_embeddings:
        src["lm_head"] = _Source("lm_head.weight", "T")
    return src


def hf_tensor_shapes(cfg: ModelConfig) -> dict:
    """Every tensor an HF Phi3 checkpoint of this config holds, in HF order, with its shape."""
    d, h, k, hd, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                      cfg.intermediate_size)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}."
        shapes[pre + "input_layernorm.weight"] = (d,)
        shapes[pre + "self_attn.qkv_proj.weight"] = ((h + 2 * k) * hd, d)
        shapes[pre + "self_attn.o_proj.weight"] = (d, h * hd)
        shapes[pre + "post_attention_layernorm.weight"] = (d,)
        shapes[pre + "mlp.gate_up_proj.weight"] = (2 * f, d)
        shapes[pre + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


# ------------------------------------------------------------------------------ reading
class _Checkpoint:
    """Open safetensors files of an HF directory; tensors looked up lazily by name."""

    def __init__(self, path: str):
        index_path = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index_path):
            index = read_json(index_path, INDEX_FILE)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (f" Found {pickles}: pickle checkpoints are not loaded (they can run code); "
                    "convert them to safetensors first.") if pickles else ""
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")
        self.files = {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise CheckpointError(f"safetensors file {file_path} listed in {INDEX_FILE} "
                                      "does not exist")
            try:
                self.files[name] = safe_open(file_path, framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read safetensors file {file_path}: {e}") from None
        self.where = {}
        for name, handle in self.files.items():
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.where[key] = handle
        if weight_map is not None:
            lost = sorted(k for k, f in weight_map.items() if k not in self.where)
            if lost:
                raise CheckpointError(f"{INDEX_FILE} lists tensors missing from their files: "
                                      f"{lost[:5]}{' ...' if len(lost) > 5 else ''}")
        self.path = path

    def check(self, cfg: ModelConfig) -> None:
        expected = hf_tensor_shapes(cfg)
        missing = [n for n in expected if n not in self.where]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.path} is missing tensor(s) {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} required by its config.json")
        for name, shape in expected.items():
            got = tuple(self.where[name].get_slice(name).get_shape())
            if got != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {list(got)} but config.json "
                                      f"implies {list(shape)}")
        extra = sorted(set(self.where) - set(expected))
        # Tied checkpoints sometimes also store lm_head.weight; old ones store rotary buffers.
        ignorable = [n for n in extra if n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq")]
        unknown = [n for n in extra if n not in ignorable]
        if unknown:
            raise CheckpointError(f"checkpoint {self.path} has tensors this Phi3 config does not "
                                  f"use: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        if ignorable:
            log.info("ignoring %d tied/buffer tensors (%s ...)", len(ignorable), ignorable[0])

    def read(self, name: str, rows: slice, cols: Optional[slice]) -> np.ndarray:
        view = self.where[name].get_slice(name)
        return view[rows] if cols is None else view[rows, cols]


def _norm(sl: slice, n: int) -> slice:
    start, stop, step = sl.indices(n)
    if step != 1:
        raise ValueError("strided shards are not supported")
    return slice(start, stop)


def _read_block(ckpt: _Checkpoint, src: _Source, layer: int, idx: tuple, shape: tuple,
                cfg: ModelConfig) -> np.ndarray:
    """The block `idx` (slices over our per-layer `shape`) of one layer's parameter."""
    name = src.name.replace("{l}", str(layer))
    idx = tuple(_norm(s, n) for s, n in zip(idx, shape))
    off = src.row_offset
    if src.kind == "copy":
        if len(shape) == 1:
            return ckpt.read(name, idx[0], None)
        return ckpt.read(name, idx[0], idx[1])
    if src.kind == "T":  # ours [in, out] = theirs[out, in].T
        a, b = idx
        return ckpt.read(name, slice(off + b.start, off + b.stop), a).T
    hd = cfg.resolved_head_dim
    if src.kind == "heads_in":  # ours [D, n, hd] from rows n*hd of theirs [rows, D]
        d, n, e = idx
        block = ckpt.read(name, slice(off + n.start * hd, off + n.stop * hd), d)
        return block.reshape(n.stop - n.start, hd, -1).transpose(2, 0, 1)[:, :, e]
    if src.kind == "heads_out":  # ours [n, hd, D] from theirs [D, n*hd]
        n, e, d = idx
        block = ckpt.read(name, d, slice(n.start * hd, n.stop * hd)).T
        return block.reshape(n.stop - n.start, hd, -1)[:, e, :]
    raise AssertionError(src.kind)


def _fetcher(ckpt: _Checkpoint, src: _Source, shape: tuple, dtype,
             cfg: ModelConfig) -> Callable[[tuple], np.ndarray]:
    def fetch(index: tuple) -> np.ndarray:
        if not src.stacked:
            return np.ascontiguousarray(_read_block(ckpt, src, 0, index, shape, cfg), dtype)
        # Fill a preallocated shard layer by layer: host memory is this shard + one layer block.
        layers = range(*_norm(index[0], shape[0]).indices(shape[0]))
        out = None
        for i, layer in enumerate(layers):
            block = _read_block(ckpt, src, layer, index[1:], shape[1:], cfg)
            if out is None:
                out = np.empty((len(layers),) + block.shape, dtype)
            out[i] = block
        return out
    return fetch


def load_hf(path: str, dtype="float32", *, compute_dtype=None, mesh=None,
            rules=DEFAULT_RULES, **config_overrides) -> Phi3ForCausalLM:
    """Load an HF Phi3 checkpoint directory (safetensors only) as a phimr_jax model.

    dtype: parameter dtype ("float32" or "bfloat16"); compute_dtype defaults to dtype.
    mesh: place every parameter straight into its sharding under `rules` (no device ever
    holds a full copy); without a mesh, parameters go to the default device.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory not found: {path}")
    pdt = dtype_name(dtype)
    cfg = ModelConfig.from_hf_dir(path, param_dtype=pdt,
                                  dtype=dtype_name(compute_dtype or pdt), **config_overrides)
    ckpt = _Checkpoint(path)
    ckpt.check(cfg)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    if mesh is not None:
        shardings = state_shardings(abstract, mesh, rules)
    else:
        single = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, abstract,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    sources = _sources(cfg)

    def place(path_, var, sharding):
        name = path_[-1].key if hasattr(path_[-1], "key") else str(path_[-1])
        shape = tuple(var.get_value().shape)
        fetch = _fetcher(ckpt, sources[name], shape, var.get_value().dtype, cfg)
        arr = jax.make_array_from_callback(shape, sharding, fetch)
        # Transfers are asynchronous: without waiting, the host blocks of every parameter stay
        # alive until their copies finish, i.e. up to a second full copy of the checkpoint.
        return var.replace(arr.block_until_ready())

    state = jax.tree.map_with_path(place, abstract, shardings,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ writing
def _host(x: jax.Array) -> np.ndarray:
    from phimr_jax.model.sharding import host_local_array
    return host_local_array(x)


def _hf_tensors(model: Phi3ForCausalLM):
    """Yield (HF name, numpy tensor) in HF order, one layer at a time."""
    cfg = model.config
    h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    yield "model.embed_tokens.weight", _host(model.embed[...])
    for layer in range(cfg.num_layers):
        p = {name: _host(getattr(model, name)[...][layer])
             for name in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")}
        pre = f"model.layers.{layer}."
        yield pre + "input_layernorm.weight", p["attn_norm"]
        qkv = [p["q"].transpose(1, 2, 0).reshape(h * hd, -1),
               p["k"].transpose(1, 2, 0).reshape(k * hd, -1),
               p["v"].transpose(1, 2, 0).reshape(k * hd, -1)]
        yield pre + "self_attn.qkv_proj.weight", np.concatenate(qkv, axis=0)
        yield pre + "self_attn.o_proj.weight", p["o"].reshape(h * hd, -1).T
        yield pre + "post_attention_layernorm.weight", p["mlp_norm"]
        yield pre + "mlp.gate_up_proj.weight", np.concatenate([p["gate"].T, p["up"].T], axis=0)
        yield pre + "mlp.down_proj.weight", p["down"].T
    yield "model.norm.weight", _host(model.final_norm[...])
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _host(model.lm_head[...]).T


def save_hf(model: Phi3ForCausalLM, path: str, *, dtype=None,
            max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, rope_format: str = "auto") -> None:
    """Write an HF Phi3 directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    dtype: dtype of the written tensors (default: the model's parameter dtype).
    max_shard_size: bytes per safetensors file; larger checkpoints are split with an index.
    Only process 0 writes in a multi-process run (all processes must call: gathers are
    collective).
    """
    cfg = model.config
    out_dtype = dtype_name(dtype or cfg.param_dtype)
    np_dtype = np.dtype(jax.numpy.dtype(out_dtype))
    shapes = hf_tensor_shapes(cfg)
    # Plan the files first so names can say "-of-N" before any byte is written.
    plan, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if current and size + nbytes > max_shard_size:
            plan.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    plan.append(current)
    n_files = len(plan)
    file_of = {}
    for i, names in enumerate(plan):
        fname = SINGLE_FILE if n_files == 1 else f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        file_of.update({n: fname for n in names})

    last_of_file = {names[-1] for names in plan}
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    pending, total = {}, 0
    for name, tensor in _hf_tensors(model):
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise AssertionError(f"{name}: produced {tensor.shape}, expected {shapes[name]}")
        pending[name] = np.ascontiguousarray(tensor.astype(np_dtype, copy=False))
        total += pending[name].nbytes
        if name in last_of_file:
            if writer:
                save_file(pending, os.path.join(path, file_of[name]), metadata={"format": "pt"})
            pending = {}
    if not writer:
        return
    if n_files > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": file_of}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(rope_format=rope_format, torch_dtype=out_dtype), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(cfg.generation_config_dict(), f, indent=2)


__all__ = ["load_hf", "save_hf", "CheckpointError", "ConfigError", "hf_tensor_shapes"]
