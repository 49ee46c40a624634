"""Logical axis names -> mesh axes, device meshes, and activation sharding constraints.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")). One rules table
(from the config) maps each logical name to mesh axes of the (`data`, `fsdp`, `tensor`) mesh.
A mesh axis is used for a dimension only if it divides that dimension and no earlier dimension
of the same array already uses it; otherwise that dimension stays replicated over it (so tiny
test models still run on big meshes, and a 3.8B model shards as the table says).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The default rules table: FSDP over the embedding dim of every weight, tensor parallelism
# over heads / MLP / vocab (Megatron layout), batch over data x fsdp.
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("cache_length", None),
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("phimr_axis_rules", default=None)


def make_mesh(shape: dict | Sequence[int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with GSPMD-style (Auto) axes; one size may be -1 (the rest)."""
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
    devices = list(devices if devices is not None else jax.devices())
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _rules_dict(rules: Iterable) -> dict:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Iterable = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims have the given logical names."""
    table = _rules_dict(rules)
    used: set = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        picked = []
        size = 1
        for axis in table.get(name, ()) if name is not None else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            picked.append(axis)
            size *= n
        used.update(picked)
        spec.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_tree(state) -> Any:
    """The `logical_axes` metadata of each Variable in an nnx State (None if absent)."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state, is_leaf=_is_var)


def state_shardings(state, mesh: Mesh, rules: Iterable = DEFAULT_RULES):
    """NamedSharding for every Variable of an (abstract) nnx State, same tree structure."""
    def one(v):
        axes = v.get_metadata().get("logical_axes") or (None,) * v.get_value().ndim
        return NamedSharding(mesh, logical_to_spec(axes, v.get_value().shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=_is_var)


def current_rules() -> tuple:
    """The rules table set by `axis_rules` (the default table outside one)."""
    rules = _RULES.get()
    return DEFAULT_RULES if rules is None else rules


@contextlib.contextmanager
def axis_rules(rules: Iterable):
    """Make `rules` the table used by `constrain` inside model code (set by the trainer)."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def batch_shards(mesh, rules: Iterable, rows: int) -> int:
    """How many shards `rows` rows of a [batch, ...] array split into on `mesh` under `rules`
    (1 without a mesh, or on one that lacks the model's axes)."""
    if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return 1
    spec = logical_to_spec(("batch",), (rows,), mesh, tuple(rules))
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint on an activation at a block boundary, by logical names.

    No-op unless a mesh is active (`jax.set_mesh`) — single-device use pays nothing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    rules = _RULES.get() or DEFAULT_RULES
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def describe(state, mesh: Mesh, rules: Iterable = DEFAULT_RULES) -> str:
    """One line per parameter: path, shape, logical axes, spec and per-device shard shape."""
    lines = []
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    for path, v in flat:
        shape = tuple(v.get_value().shape)
        axes = v.get_metadata().get("logical_axes") or (None,) * len(shape)
        spec = logical_to_spec(axes, shape, mesh, rules)
        shard = NamedSharding(mesh, spec).shard_shape(shape)
        lines.append(f"{'.'.join(map(str, path))} {list(shape)} axes={list(axes)} "
                     f"spec={tuple(spec)} shard={list(shard)}")
    return "\n".join(lines) + "\n"


def host_local_array(x: jax.Array) -> np.ndarray:
    """Full value of a (possibly sharded, multi-process) array as numpy on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(gather_to_every_process(x))


_BARRIERS = itertools.count()  # every process calls in the same order, so the names agree
BARRIER_TIMEOUT_MS = 30 * 60 * 1000


def gather_to_every_process(tree):
    """`process_allgather(tree, tiled=True)`, after a barrier that holds every process until
    all of them have computed `tree`.

    Why the barrier: XLA's gloo CPU collectives connect a new clique (a set of devices first
    used together by a collective) through the coordination service with a fixed 30 s limit.
    When one process is still compiling or sampling (two processes sharing 2 busy cores), the
    other's first all-gather fails with "Gloo context initialization failed: DEADLINE_EXCEEDED".
    The coordination service's own barrier waits as long as we ask; once every process stands
    at it, the clique connects at once. On one process this is plain `np.asarray`.
    """
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    jax.block_until_ready(tree)
    sync_processes("gather")
    return multihost_utils.process_allgather(tree, tiled=True)


class RunsTogether:
    """A jitted function whose every new compilation first runs on all processes at once.

    Why: a jitted computation over a mesh that spans processes holds collectives, and the first
    collective over a new set of devices connects a gloo clique with the 30 s limit described
    in `gather_to_every_process`. A process still compiling (or tokenising, or scoring) more
    than 30 s after another has started the same computation makes that one fail inside it
    (`tests/test_multihost.py`, a process 40 s late to a jitted all-reduce). So, on more
    than one process, a call whose argument signature (tree structure, shapes, dtypes,
    shardings, static values) is new compiles ahead of time (`lower().compile()`, which fills
    jit's own compile cache), waits at the coordination service's barrier, then runs. Later
    calls with a signature already seen go straight to jit. On one process: plain jit.
    """

    def __init__(self, jitted):
        self._jitted = jitted
        self._seen = set()

    def __call__(self, *args, **kwargs):
        if jax.process_count() > 1:
            key = _call_signature(args, kwargs)
            if key not in self._seen:
                self._jitted.lower(*args, **kwargs).compile()
                sync_processes("first_run")
                self._seen.add(key)
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):  # lower, _cache_size, clear_cache, ... of the jitted function
        return getattr(self._jitted, name)


def _call_signature(args, kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
                          if hasattr(x, "shape") else (type(x), x) for x in leaves)


def sync_processes(tag: str) -> None:
    """Wait until every process reaches this call (the distributed runtime's barrier, no
    device collective). No-op on one process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client jax.distributed.initialize started
    distributed.global_state.client.wait_at_barrier(
        f"phimr_{tag}_{next(_BARRIERS)}", timeout_in_ms=BARRIER_TIMEOUT_MS)
