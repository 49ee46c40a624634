"""Trainer options: LR schedules, remat, bf16 compute over f32 master weights, init from HF."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from phimr_jax.model import config as mc
from phimr_jax.model.dtypes import resolve_compute_dtype
from phimr_jax.model.phi3 import init_model
from phimr_jax.stages import midtrain
from phimr_jax.train import checkpointing, losses
from phimr_jax.train.config_base import data_config, train_config
from phimr_jax.train.metrics import read_metrics
from phimr_jax.train.optim import schedule
from tests.data import hf_tokenizer_dir
from tests.hf_reference import make_hf_model


@pytest.mark.parametrize("decay,end", [("cosine", 0.0), ("linear", 0.1), ("constant", 1.0)])
def test_schedule_warmup_then_decay(decay, end):
    cfg = ConfigDict({"learning_rate": 1e-3, "warmup_fraction": 0.1, "decay": decay,
                      "end_lr_fraction": end if decay != "constant" else 0.0})
    lr = schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-3 * end, abs=1e-9)
    if decay == "cosine":
        assert float(lr(55)) == pytest.approx(5e-4, rel=1e-3)  # halfway down the cosine


def _grads(cfg, batch):
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(p):
        total, weight, _ = losses.cross_entropy(nnx.merge(graphdef, p), batch, chunk_size=8)
        return total / weight
    return jax.jit(jax.grad(loss))(nnx.to_pure_dict(state))


def _batch(seed=0, bsz=2, seq=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 512, size=(bsz, seq + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((bsz, seq), np.float32)}


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradients(policy):
    batch = _batch()
    ref = _grads(mc.tiny(initializer_range=0.125), batch)
    got = _grads(mc.tiny(initializer_range=0.125, remat_policy=policy), batch)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_bf16_compute_keeps_f32_master_weights():
    batch = _batch(1)
    f32 = _grads(mc.tiny(initializer_range=0.125), batch)
    bf16 = _grads(mc.tiny(initializer_range=0.125, dtype="bfloat16"), batch)
    for name in f32:
        assert bf16[name].dtype == np.float32, name
        cos = np.sum(f32[name] * bf16[name]) / (np.linalg.norm(f32[name]) *
                                                np.linalg.norm(bf16[name]) + 1e-30)
        assert cos > 0.97, (name, cos)


def test_auto_compute_dtype_follows_the_hardware(tmp_path):
    """"auto": bfloat16 on accelerators and on CPUs whose flags show bfloat16 units, float32 on
    other CPUs (where bfloat16 is emulated); explicit names pass through."""
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx512bf16 = tmp_path / "avx512bf16"
    avx512bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    missing = str(tmp_path / "none")
    assert resolve_compute_dtype("auto", "cpu", str(avx2)) == "float32"
    assert resolve_compute_dtype("auto", "cpu", str(amx)) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", str(avx512bf16)) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", missing) == "float32"
    for backend in ("gpu", "tpu"):
        assert resolve_compute_dtype("auto", backend, str(avx2)) == "bfloat16"
    assert resolve_compute_dtype("bf16", "cpu", str(avx2)) == "bfloat16"
    assert resolve_compute_dtype("float32", "tpu") == "float32"
    with pytest.raises(mc.ConfigError):
        resolve_compute_dtype("int8", "cpu")


def test_midtrain_initialised_from_hf_dir(tmp_path, torch_cpu):
    """init.hf_dir: weights from safetensors, the HF tokenizer found beside them."""
    hf_dir = str(tmp_path / "hf")
    make_hf_model(mc.tiny(), seed=0).save_pretrained(hf_dir)
    for name in os.listdir(hf_tokenizer_dir()):
        shutil.copy(os.path.join(hf_tokenizer_dir(), name), hf_dir)
    c = train_config("midtrain")
    c.data = data_config()
    c.data.demo, c.data.demo_train, c.data.demo_heldout = True, 100, 4
    c.data.seq_len, c.data.global_batch_size = 128, 8
    c.data.eval_problems, c.data.eval_max_new_tokens = 4, 8
    c.workdir = str(tmp_path / "run")
    c.init.hf_dir = hf_dir
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 1, 3
    c.eval_every_steps = 3
    c.tensorboard = False
    c.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    c.model.dtype = "auto"  # The demo presets' setting: resolved before the model is built.
    midtrain.run(c)
    model, info, step = checkpointing.restore_model(c.workdir)
    assert model.config.dtype == resolve_compute_dtype("auto")
    assert step == 3 and info["tokenizer_dir"] == hf_dir and info["init"] == f"HF {hf_dir}"
    rows = read_metrics(c.workdir)
    assert rows[0]["data/num_kept"] + rows[0]["data/num_too_long"] == 100  # dropped, counted
    assert all(np.isfinite(r["loss"]) for r in rows[1:]) and "eval/accuracy" in rows[-1]
    assert model.config.vocab_size == 512
