"""The convert / export CLI as a user runs it: HF dir -> Orbax run -> HF dir (+ tokenizer)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from phimr_jax.model import config as mc
from phimr_jax.train import checkpointing
from tests.hf_reference import hf_logits, make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "phimr_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _tiny_tokenizer(path):
    """A real byte-level BPE tokenizer trained on a few lines, saved the HF way."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["<pad>", "<s>", "<|endoftext|>", "<|end|>"]
    tok.train_from_iterator(["What is 2 + 3? The answer is 5.", "Compute 7 * 6 = 42."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<pad>").save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, torch_cpu):
    path = str(tmp_path_factory.mktemp("hf_in"))
    cfg = mc.tiny(num_layers=2)
    model = make_hf_model(cfg, seed=4)
    model.save_pretrained(path)
    _tiny_tokenizer(path)
    return cfg, model, path


def test_convert_then_export(hf_dir, tmp_path):
    import transformers

    cfg, hf_model, src = hf_dir
    run, out = str(tmp_path / "run"), str(tmp_path / "hf_out")
    res = _cli("--config=configs/convert.py", f"--config.hf_dir={src}", f"--config.workdir={run}",
               "--config.mesh.fsdp=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert checkpointing.latest_step(run) == 0
    assert os.path.isfile(os.path.join(run, "tokenizer", "tokenizer.json"))
    model, info, step = checkpointing.restore_model(run)
    assert info["stage"] == "convert" and model.config.num_layers == 2
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 70))
    np.testing.assert_array_less(np.abs(np.asarray(model(ids)) - hf_logits(hf_model, ids)).max(),
                                 1e-4)

    res = _cli("--config=configs/export.py", f"--config.workdir={run}", f"--config.out_dir={out}",
               "--config.dtype=bfloat16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok("What is 2 + 3?", return_tensors="pt")
    gen = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5
    # bf16 export of f32 weights: logits stay close to the original.
    diff = np.abs(hf_logits(reloaded, ids) - hf_logits(hf_model, ids))
    assert diff.mean() < 0.05 * np.abs(hf_logits(hf_model, ids)).mean()


def test_cli_errors_are_one_line(tmp_path):
    res = _cli("--config=configs/convert.py", f"--config.hf_dir={tmp_path}/missing",
               f"--config.workdir={tmp_path}/run")
    assert res.returncode == 2
    assert "error: HF model directory not found" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--config=configs/convert.py", f"--config.workdir={tmp_path}/run")
    assert res.returncode == 2 and "--config.hf_dir=..." in res.stderr
    res = _cli("--config=configs/export.py", f"--config.workdir={tmp_path}/empty",
               f"--config.out_dir={tmp_path}/o")
    assert res.returncode == 2 and "no checkpoints in run directory" in res.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = _cli("--config=configs/convert.py", f"--config.hf_dir={tmp_path}/bad",
               f"--config.workdir={tmp_path}/run")
    assert res.returncode == 2 and "model_type 'llama'" in res.stderr
    assert "Traceback" not in res.stderr


def test_init_demo_then_export_loads_in_transformers(tmp_path, torch_cpu):
    """The README's main command path: a fresh demo model -> run checkpoint -> HF directory."""
    import transformers

    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    res = _cli("--config=configs/init.py:demo", f"--config.workdir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("--config=configs/export.py", f"--config.workdir={run}", f"--config.out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    model, info, _ = checkpointing.restore_model(run)
    assert info["stage"] == "init" and model.config == mc.demo()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 40))
    np.testing.assert_array_less(np.abs(np.asarray(model(ids)) - hf_logits(hf, ids)).max(), 1e-4)
