"""Phi-4-mini at full size without allocating it: parameter count and per-parameter sharding."""

import os

import jax
import numpy as np
from flax import nnx

from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import abstract_model, init_model, param_count
from phimr_jax.model.sharding import describe, logical_to_spec, make_mesh, state_shardings

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "phi4_mini_sharding_fsdp4_tensor2.txt")


def test_phi4_mini_parameter_count():
    assert param_count(mc.phi4_mini()) == 3_836_021_760
    state = nnx.state(abstract_model(mc.phi4_mini()), nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    sizes = {".".join(map(str, p)): int(np.prod(v.get_value().shape))
             for p, v in nnx.to_flat_state(state)}
    assert sizes["embed"] == 614_596_608
    per_layer = sum(n for k, n in sizes.items() if k not in ("embed", "final_norm")) // 32
    assert per_layer == 100_669_440 and sizes["final_norm"] == 3072


def test_phi4_mini_sharding_golden():
    """Per-parameter sharding on an (fsdp 4, tensor 2) mesh of 8 fake devices. Regenerate with
    PHIMR_REGEN_GOLDEN=1 after an intended change, and review the diff."""
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    state = nnx.state(abstract_model(mc.phi4_mini()))
    text = describe(state, mesh)
    if os.environ.get("PHIMR_REGEN_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(text)
    with open(GOLDEN) as f:
        assert text == f.read()
    # Sensible: every weight matrix is split 8 ways (no device holds a full copy), norms are
    # tiny and replicated, and per-device parameter bytes are 1/8 of the total up to norms.
    shardings = state_shardings(state, mesh)
    total = per_device = 0
    for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        shape = v.get_value().shape
        shard = s.shard_shape(shape)
        total += np.prod(shape)
        per_device += np.prod(shard)
        if len(shape) > 1 and "norm" not in path[-1]:
            assert np.prod(shape) == 8 * np.prod(shard), (path, shape, shard)
    assert per_device < total / 8 * 1.001


def test_rules_fall_back_to_replication_when_indivisible():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == jax.sharding.PartitionSpec("fsdp")
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == \
        jax.sharding.PartitionSpec(("data", "fsdp"))
    assert logical_to_spec(("batch",), (2, 5), mesh) == jax.sharding.PartitionSpec("data")


def test_init_model_on_mesh_is_sharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = init_model(mc.tiny(), seed=0, mesh=mesh)
    up = model.up[...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 32, 64)
    plain = init_model(mc.tiny(), seed=0)
    np.testing.assert_array_equal(np.asarray(up), np.asarray(plain.up[...]))
