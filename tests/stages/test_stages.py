"""Stages 1 and 2 through the CLI, as a user runs them: kill/resume, SIGTERM, masking, demo."""

import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from phimr_jax.stages import distill, sft
from phimr_jax.stages.distill import resolve_tokenizer
from phimr_jax.train import checkpointing
from phimr_jax.train.metrics import read_metrics
from tests.test_configs import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small and fast: a 300-problem corpus, 128-token rows, 8 rows per step, no evaluation.
FAST = ["--config.data.demo_train=300", "--config.data.demo_heldout=16",
        "--config.data.seq_len=128", "--config.data.global_batch_size=8",
        "--config.eval_every_steps=0", "--config.log_every_steps=2",
        "--config.async_checkpoint=true"]


def _cmd(config, workdir, *extra):
    return [sys.executable, "-m", "phimr_jax.main", f"--config={config}",
            f"--config.workdir={workdir}", *FAST, *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _run(config, workdir, *extra):
    res = subprocess.run(_cmd(config, workdir, *extra), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
    marker = os.path.join(workdir, "checkpoints", str(step), "commit_success.txt")
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        assert proc.poll() is None, "run ended before the checkpoint appeared"
        assert time.time() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.05)


def sigkill_after_checkpoint(cmd, workdir, step) -> None:
    """Start `cmd`, SIGKILL it as soon as its step-`step` checkpoint is committed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(proc, workdir, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL


def _params(workdir):
    model, _, step = checkpointing.restore_model(workdir)
    return step, {n: np.asarray(getattr(model, n)[...]) for n in ("embed", "q", "up", "final_norm")}


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_exact(tmp_path):
    steps = ["--config.total_steps=40", "--config.checkpoint_every_steps=10"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _run("configs/midtrain.py:demo", straight, *steps)
    sigkill_after_checkpoint(_cmd("configs/midtrain.py:demo", killed, *steps), killed, 10)
    assert checkpointing.latest_step(killed) < 40
    _run("configs/midtrain.py:demo", killed, *steps)
    a, b = read_metrics(straight), read_metrics(killed)
    assert [(r["step"], r.get("loss")) for r in a] == [(r["step"], r.get("loss")) for r in b]
    assert a[-1]["step"] == 40 and a[-1]["loss"] < a[1]["loss"]
    step_a, pa = _params(straight)
    step_b, pb = _params(killed)
    assert step_a == step_b == 40
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd("configs/midtrain.py:demo", workdir, "--config.total_steps=400",
                                 "--config.checkpoint_every_steps=5"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_checkpoint(proc, workdir, 5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in err
    saved = checkpointing.latest_step(workdir)
    assert 5 <= saved < 400
    assert read_metrics(workdir)[-1]["step"] == saved


def test_sft_batches_mask_prompt_and_train_end(tmp_path):
    config = load("sft", "demo")
    config.workdir = str(tmp_path)
    config.data.demo_train = 200
    config.data.demo_heldout = 8
    config.data.min_difficulty = 2.0  # the harder-subset filter (the demo preset trains on all)
    config.data.padding_free = False  # one example per row (the demo preset's setting)
    tokenizer, _ = resolve_tokenizer(config, "")
    dataset, stats = sft.make_data(config, tokenizer)
    assert stats["num_filtered"] > 0 and stats["num_kept"] > 0  # the harder subset only
    batch = next(iter(dataset))
    assert batch["inputs"].shape == (16, config.data.seq_len)
    for row in range(4):
        mask, targets = batch["loss_mask"][row], batch["targets"][row]
        real = batch["segment_ids"][row] > 0
        assistant = int(np.argmax(batch["inputs"][row] == tokenizer.assistant_id))
        assert mask[:assistant].sum() == 0  # prompt (up to <|assistant|>) carries no loss
        last = int(np.flatnonzero(mask)[-1])
        assert targets[last] == tokenizer.end_id  # the final <|end|> carries loss
        assert mask[assistant:last + 1].all() and not mask[~real].any()


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_padding_free_sft_step_is_the_padded_step(tmp_path, impl):
    """data.padding_free: the same 16 examples in shared rows give the padded
    batch's loss sum, trained-token count and gradient (each example attends only to itself,
    positions from 0), on fewer rows, a multiple of the batch's 8-device split here."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phimr_jax.model import config as mc
    from phimr_jax.model.phi3 import init_model
    from phimr_jax.train import losses

    config = load("sft", "demo")
    config.workdir = str(tmp_path)
    config.data.demo_train, config.data.demo_heldout = 200, 8
    config.data.padding_free = True
    tokenizer, _ = resolve_tokenizer(config, "")
    assert sft._row_multiple(config) == 8  # conftest: 8 fake devices, the batch over all
    packed = list(itertools.islice(iter(sft.make_data(config, tokenizer)[0]), 8))
    config.data.padding_free = False
    padded = list(itertools.islice(iter(sft.make_data(config, tokenizer)[0]), 8))
    rows = [b["inputs"].shape for b in packed]
    assert set(rows) <= {(8, 256), (16, 256)} and (8, 256) in rows, rows
    step = rows.index((8, 256))  # the same step, padded and padding-free
    packed, padded = packed[step], padded[step]
    assert padded["inputs"].shape == (16, 256) and packed["segment_ids"].max() > 1
    model = init_model(mc.demo(attention_impl=impl, attention_block_size=64), seed=0)

    def loss_and_grad(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        total, weight, _ = losses.cross_entropy(model, batch)
        grads = nnx.grad(lambda m: losses.cross_entropy(m, batch)[0])(model)
        return total, weight, jax.tree.leaves(nnx.state(grads))

    total_a, weight_a, grads_a = loss_and_grad(padded)
    total_b, weight_b, grads_b = loss_and_grad(packed)
    assert float(weight_a) == float(weight_b) > 0
    np.testing.assert_allclose(float(total_b), float(total_a), rtol=1e-5)
    # float32 sums over the same tokens in another order: errors scale with each leaf's
    # magnitude, not with an entry's (a near-cancelling entry of 1e-3 moved by 2e-6).
    for a, b in zip(grads_a, grads_b):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_sft_oversampling_settings_reach_the_data(tmp_path):
    """data.oversample_*: each kept example of difficulty >= 4 appears 3 times per epoch, and
    rows_per_epoch (which sets total_steps=-1) counts the repeats."""
    config = load("sft", "demo")
    config.workdir = str(tmp_path)
    config.data.demo_train, config.data.demo_heldout = 200, 8
    tokenizer, _ = resolve_tokenizer(config, "")
    assert (config.data.oversample_min_difficulty, config.data.oversample_repeats) == (6.0, 8)
    config.data.oversample_repeats = 1  # Off (the demo preset repeats level 6 8 times).
    _, plain = sft.make_data(config, tokenizer)
    config.data.oversample_min_difficulty, config.data.oversample_repeats = 4.0, 3
    _, stats = sft.make_data(config, tokenizer)
    source = distill.open_train_source(config)
    hard = sum(source[i]["difficulty"] >= 4 for i in range(len(source)))
    assert 0 < hard < len(source) and plain["num_kept"] == len(source)
    assert stats["rows_per_epoch"] == plain["rows_per_epoch"] + 2 * hard


@pytest.mark.slow
def test_midtrain_then_sft_demo(tmp_path):
    """configs/midtrain.py:demo then configs/sft.py:demo from it (shortened): losses fall and
    held-out accuracy is in metrics.jsonl; SFT inherits stage 1's weights and tokenizer."""
    s1, s2 = str(tmp_path / "midtrain"), str(tmp_path / "sft")
    evals = ["--config.data.eval_problems=16", "--config.data.eval_max_new_tokens=48"]
    _run("configs/midtrain.py:demo", s1, "--config.total_steps=60",
         "--config.eval_every_steps=60", *evals)
    _run("configs/sft.py:demo", s2, f"--config.init.checkpoint={s1}", "--config.total_steps=30",
         "--config.eval_every_steps=30", "--config.data.min_difficulty=2", *evals)
    for workdir in (s1, s2):
        rows = read_metrics(workdir)
        trained = [r for r in rows if "loss" in r]
        assert trained[-1]["loss"] < trained[0]["loss"], workdir
        assert 0.0 <= rows[-1]["eval/accuracy"] <= 1.0 and "eval/finished" in rows[-1]
    _, info, _ = checkpointing.restore_model(s2)
    assert info["init"].startswith(f"run {s1}") and info["tokenizer_dir"] == f"{s1}/tokenizer"
    assert read_metrics(s2)[0]["data/num_filtered"] > 0
    # SFT starts where stage 1 ended: its first loss is far below a fresh model's.
    assert read_metrics(s2)[1]["loss"] < read_metrics(s1)[1]["loss"]


def test_padding_free_sft_refuses_several_processes(tmp_path, monkeypatch):
    """Each host would pack its examples into its own number of rows; the global batch needs
    one shape on every host, so a multi-host run stops with the reason."""
    config = load("sft", "demo")
    config.data.padding_free = True
    monkeypatch.setattr(sft.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="padding_free"):
        sft._row_multiple(config)
    config.data.padding_free = False
    assert sft._row_multiple(config) == 1


def test_demo_corpus_is_shared_by_runs_with_the_same_settings(tmp_path):
    """data.demo_dir (the recipe's stages): runs with the same corpus settings and seed find
    one corpus there, generated once; another seed or size gets its own; without demo_dir
    each run has its own copy under its workdir."""
    def config(workdir, **data):
        c = load("sft", "demo")
        c.workdir, c.data.demo_dir = str(tmp_path / workdir), str(tmp_path / "shared")
        c.data.update({**dict(demo_train=60, demo_heldout=8, demo_fresh=8), **data})
        return c
    first = distill.demo_paths(config("a"))
    made = os.path.getmtime(first["train"])
    assert distill.demo_paths(config("b")) == first  # no second copy
    assert os.path.getmtime(first["train"]) == made
    other = distill.demo_paths(config("c", demo_train=61))
    assert os.path.dirname(other["train"]) != os.path.dirname(first["train"])
    reseeded = config("d")
    reseeded.seed = 5
    assert distill.demo_paths(reseeded)["train"] != first["train"]
    own = config("e")
    own.data.demo_dir = ""
    paths = distill.demo_paths(own)
    assert paths["train"] == str(tmp_path / "e" / "demo_data" / "train.jsonl")
    assert open(paths["train"]).read() == open(first["train"]).read()
