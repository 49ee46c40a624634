"""HF -> JAX -> HF conversion: bitwise tensors, sharded files, dtypes, meshes, RoPE spellings."""

import copy
import json
import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from phimr_jax import load_hf, save_hf
from phimr_jax.model import config as mc
from phimr_jax.model.sharding import make_mesh
from tests.hf_reference import hf_logits, make_hf_model


def _tensors(path):
    """All tensors of an HF directory, by name (bf16 kept as ml_dtypes.bfloat16)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, torch_cpu):
    cfg = mc.tiny(num_layers=3)
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_model(cfg, seed=11)
    model.save_pretrained(path)
    return cfg, model, str(path)


def _from_pretrained_quietly(path, caplog):
    """Load with transformers and fail on missing/unexpected/newly initialised weights."""
    import transformers

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, attn_implementation="eager")
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])
    bad = [r.getMessage() for r in caplog.records
           if any(w in r.getMessage().lower() for w in ("missing", "unexpected", "newly initialized",
                                                         "not initialized", "not used"))]
    assert not bad, bad
    return model.eval()


def test_roundtrip_bitwise_and_loads_in_transformers(hf_dir, tmp_path, caplog):
    cfg, hf_model, src = hf_dir
    out = str(tmp_path / "out")
    save_hf(load_hf(src), out)
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after the round trip"
    src_eos = json.load(open(os.path.join(src, "generation_config.json")))["eos_token_id"]
    out_eos = json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"]
    assert set(out_eos) == set(src_eos if isinstance(src_eos, list) else [src_eos])
    reloaded = _from_pretrained_quietly(out, caplog)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 90))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf_model, ids))


def test_bf16_roundtrip_bitwise(hf_dir, tmp_path, torch_cpu):
    """A bf16 checkpoint loads as bf16 parameters and writes back the same bits."""
    cfg, hf_model, _ = hf_dir
    src = str(tmp_path / "bf16")
    copy.deepcopy(hf_model).to(dtype=torch_cpu.bfloat16).save_pretrained(src)
    model = load_hf(src, dtype="bfloat16")
    assert model.q[...].dtype == jax.numpy.bfloat16 and model.config.dtype == "bfloat16"
    out = str(tmp_path / "bf16_out")
    save_hf(model, out)
    a, b = _tensors(src), _tensors(out)
    assert all(a[n].tobytes() == b[n].tobytes() and str(b[n].dtype) == "bfloat16" for n in a)
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"


def test_sharded_checkpoint_both_ways(hf_dir, tmp_path, caplog):
    """Above max_shard_size save_hf writes model-0000x-of-0000y files + index; both load."""
    cfg, hf_model, src = hf_dir
    model = load_hf(src)
    out = str(tmp_path / "sharded")
    save_hf(model, out, max_shard_size=200_000)
    files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(src).values())
    again = load_hf(out)
    for name in ("embed", "q", "k", "v", "o", "gate", "up", "down", "attn_norm", "final_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(again, name)[...]),
                                      np.asarray(getattr(model, name)[...]))
    reloaded = _from_pretrained_quietly(out, caplog)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 30))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf_model, ids))
    # HF's own sharded save loads too.
    hf_sharded = str(tmp_path / "hf_sharded")
    hf_model.save_pretrained(hf_sharded, max_shard_size="100KB")
    assert os.path.exists(os.path.join(hf_sharded, "model.safetensors.index.json"))
    np.testing.assert_array_equal(np.asarray(load_hf(hf_sharded).up[...]),
                                  np.asarray(model.up[...]))


def test_load_into_mesh_places_shards(hf_dir):
    """With a mesh, each parameter lands in its rules-table sharding with the same values."""
    cfg, _, src = hf_dir
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = load_hf(src, mesh=mesh)
    plain = load_hf(src)
    q = sharded.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (3, 16, 2, 16)
    for name in ("embed", "q", "k", "v", "o", "gate", "up", "down", "final_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, name)[...]),
                                      np.asarray(getattr(plain, name)[...]))
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 20))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda m, x: m(x))(sharded, ids)
    # Contractions split over fsdp shards add in another order: f32 rounding (~1e-6 relative),
    # held to the same 1e-4 bound as HF parity.
    np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(plain(ids))).max(), 1e-4)


def test_v5_rope_parameters_spelling(tmp_path, torch_cpu):
    """A config.json in the transformers-v5 `rope_parameters` spelling loads identically, and
    save_hf can write that spelling back."""
    cfg = mc.tiny()
    legacy = cfg.to_hf_dict(rope_format="legacy")
    v5 = cfg.to_hf_dict(rope_format="v5")
    assert "rope_scaling" in legacy and "rope_parameters" not in legacy
    assert v5["rope_parameters"]["rope_type"] == "longrope" and "rope_scaling" not in v5
    stops = cfg.stop_token_ids  # config.json alone carries no stop tokens (see from_hf_dir)
    assert (mc.ModelConfig.from_hf_dict(legacy, stop_token_ids=stops)
            == mc.ModelConfig.from_hf_dict(v5, stop_token_ids=stops) == cfg)
    hf_model = make_hf_model(cfg, seed=5, rope_format="v5")
    hf_model.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path))
    assert model.config == cfg.replace(stop_token_ids=(cfg.eos_token_id,))  # generation_config
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 80))
    np.testing.assert_array_less(np.abs(np.asarray(model(ids)) - hf_logits(hf_model, ids)).max(),
                                 1e-4)


def test_published_phi4_mini_config():
    """The published Phi-4-mini config.json maps to the phi4_mini preset exactly."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference",
                        "phi4-mini-config.json")
    if not os.path.exists(path):
        pytest.skip("../shared/reference not beside the project")
    with open(path) as f:
        published = json.load(f)
    assert mc.ModelConfig.from_hf_dict(published).stop_token_ids == (199999,)
    # The published generation_config.json adds <|end|>: eos_token_id [200020, 199999].
    cfg = mc.ModelConfig.from_hf_dict(published, stop_token_ids=(200020, 199999))
    assert cfg == mc.phi4_mini()
    assert cfg.rotary_dim == 96 and cfg.resolved_head_dim == 128
    from phimr_jax.model.rope import attention_factor
    assert abs(attention_factor(cfg) - 1.19024) < 1e-5
    back = cfg.to_hf_dict()
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rope_scaling",
                "partial_rotary_factor", "original_max_position_embeddings", "sliding_window",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert back[key] == published[key], key


def test_load_reads_tensor_by_tensor(tmp_path, torch_cpu):
    """Transient host memory while loading stays near one tensor, not the checkpoint.

    tracemalloc sees every numpy buffer the loader allocates. On the CPU backend XLA may adopt
    a returned buffer as the device array itself (zero copy), so what the finished model still
    holds is subtracted: the rest is loader overhead, which on an accelerator is all the host
    ever holds."""
    import tracemalloc

    cfg = mc.tiny(num_layers=8, hidden_size=128, num_heads=8, num_kv_heads=2,
                  intermediate_size=512, vocab_size=1024)
    make_hf_model(cfg, seed=0).save_pretrained(tmp_path)
    tensors = _tensors(str(tmp_path))
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    del tensors
    tracemalloc.start()
    model = load_hf(str(tmp_path))
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert model.config.num_layers == 8
    assert total > 8 * largest  # the bound below is meaningful for this checkpoint
    # One stacked parameter ([layers, ...], the loader's unit) plus one layer block in flight.
    stacked = max(v.nbytes for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert stacked < total / 3
    assert peak - retained < stacked + 2 * largest, (peak, retained, stacked, largest, total)
