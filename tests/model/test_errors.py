"""Bad input gives a clear error naming the file / tensor / field, not a deep stack trace."""

import json
import os
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from phimr_jax import CheckpointError, ConfigError, load_hf
from phimr_jax.model import config as mc
from tests.hf_reference import make_hf_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, torch_cpu):
    path = tmp_path_factory.mktemp("good")
    make_hf_model(mc.tiny(num_layers=2), seed=1).save_pretrained(path)
    return str(path)


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    path = str(tmp_path / "bad")
    shutil.copytree(good_dir, path)
    return path


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def _edit_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="HF model directory not found"):
        load_hf(str(tmp_path / "nope"))


def test_missing_config(bad_dir):
    os.remove(os.path.join(bad_dir, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf(bad_dir)


def test_unreadable_config(bad_dir):
    with open(os.path.join(bad_dir, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="cannot read config.json"):
        load_hf(bad_dir)


def test_wrong_model_type(bad_dir):
    _edit_config(bad_dir, model_type="llama")
    with pytest.raises(ConfigError, match="model_type 'llama'.*phi3"):
        load_hf(bad_dir)


@pytest.mark.parametrize("spelling", ["legacy", "v5"])
@pytest.mark.parametrize("key", ["short_factor", "long_factor"])
def test_factor_list_wrong_length(bad_dir, key, spelling):
    cfg = mc.tiny(num_layers=2).to_hf_dict(rope_format=spelling)
    rope = cfg["rope_scaling"] if spelling == "legacy" else cfg["rope_parameters"]
    rope[key] = rope[key][:-1]
    json.dump(cfg, open(os.path.join(bad_dir, "config.json"), "w"))
    with pytest.raises(ConfigError, match=f"{key} has 5 values but rotary_dim // 2 = 6"):
        load_hf(bad_dir)


def test_no_weights_and_pickle_refused(bad_dir):
    os.remove(os.path.join(bad_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(bad_dir)
    open(os.path.join(bad_dir, "pytorch_model.bin"), "wb").write(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_hf(bad_dir)


def test_corrupt_safetensors(bad_dir):
    with open(os.path.join(bad_dir, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        load_hf(bad_dir)


def test_index_names_missing_file(bad_dir):
    os.rename(os.path.join(bad_dir, "model.safetensors"), os.path.join(bad_dir, "a.safetensors"))
    names = list(load_file(os.path.join(bad_dir, "a.safetensors")))
    weight_map = {n: "a.safetensors" for n in names}
    weight_map["model.norm.weight"] = "b.safetensors"
    json.dump({"weight_map": weight_map},
              open(os.path.join(bad_dir, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="b.safetensors listed in .* does not exist"):
        load_hf(bad_dir)


def test_missing_tensor_is_named(bad_dir):
    _edit_tensors(bad_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['model.layers.1.mlp.down_proj"):
        load_hf(bad_dir)


def test_shape_mismatch_is_named(bad_dir):
    def shrink(t):
        t["model.layers.0.self_attn.qkv_proj.weight"] = \
            t["model.layers.0.self_attn.qkv_proj.weight"][:-16]
    _edit_tensors(bad_dir, shrink)
    with pytest.raises(CheckpointError,
                       match=r"model.layers.0.self_attn.qkv_proj.weight has shape \[112, 64\] but "
                             r"config.json implies \[128, 64\]"):
        load_hf(bad_dir)


def test_unexpected_tensor_is_named(bad_dir):
    def add(t):
        t["model.layers.9.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"]
    _edit_tensors(bad_dir, add)
    with pytest.raises(CheckpointError, match="does not use: \\['model.layers.9.mlp.down_proj"):
        load_hf(bad_dir)


def test_inconsistent_heads():
    with pytest.raises(ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        mc.tiny(num_kv_heads=3)
