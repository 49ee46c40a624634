"""The shared trainer on a synthetic stage: sharded == single-device, accumulation, packing,
NaN stop, SIGTERM, and bit-exact resume."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phimr_jax.model import config as mc
from phimr_jax.model import sharding
from phimr_jax.model.phi3 import init_model
from phimr_jax.train import checkpointing, losses, trainer
from phimr_jax.train.config_base import train_config
from phimr_jax.train.metrics import read_metrics
from phimr_jax.train.optim import make_optimizer
from phimr_jax.train.state import _global_batch

TINY = dict(initializer_range=0.125)


def _batches(n, bsz=8, seq=32, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(4, vocab, size=(bsz, seq + 1)).astype(np.int32)
        mask = (rng.random((bsz, seq)) < 0.7).astype(np.float32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask})
    return out


class _Tok:
    vocab_size = 512


def _stage(batches, poison_step=None, loss_scale=1.0):
    def make_data(config, tokenizer):
        items = [dict(b, poison=np.full((b["inputs"].shape[0],), np.nan if i == poison_step
                                         else 1.0, np.float32)) for i, b in enumerate(batches)]
        return grain.MapDataset.source(items).to_iter_dataset(), {"rows_per_epoch": len(items)}

    def loss_fn(model, batch):
        loss, weight, sums = losses.cross_entropy(model, batch, chunk_size=16)
        scale = jnp.mean(batch["poison"]) * loss_scale
        return loss * scale, weight, {k: v * scale for k, v in sums.items()}

    return trainer.Stage("synthetic", make_data, loss_fn, losses.cross_entropy_weight,
                         tokenizer_fn=lambda config, d: (_Tok(), ""))


def _config(workdir, steps, **mesh):
    c = train_config("synthetic")
    c.workdir = str(workdir)
    c.model.preset = "tiny"
    c.model.overrides = TINY
    c.total_steps = steps
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.keep_checkpoints = 0
    c.tensorboard = False
    c.optim.learning_rate = 1e-2
    c.optim.warmup_fraction = 0.25
    c.data = {"global_batch_size": 8, "num_epochs": 1}
    c.mesh = mesh or {"data": 2, "fsdp": 2, "tensor": 2}
    return c


def _step_once(mesh_shape, devices, accum=1):
    mesh = sharding.make_mesh(mesh_shape, devices)
    model = init_model(mc.tiny(**TINY), seed=0, mesh=mesh)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    cfg = _config("/tmp/unused", 4)
    cfg.optim.grad_accum_steps = accum
    cfg.optim.warmup_fraction = 0.0  # so this single step has a non-zero learning rate
    # Adam's first update is g / (|g| + eps): with eps=1e-8 it is ill-conditioned for gradient
    # entries near 1e-8, where f32 reassociation across shards flips it. A larger eps keeps the
    # update a smooth function of the gradient so params can be compared at 1e-6.
    cfg.optim.eps = 1e-3
    tx = make_optimizer(cfg.optim, 4)
    stage = _stage([])
    batch = dict(_batches(1)[0], poison=np.ones((8,), np.float32))
    with jax.set_mesh(mesh):
        step = jax.jit(trainer._make_step(graphdef, stage, tx, accum))
        gb = _global_batch(batch, mesh, sharding.DEFAULT_RULES)
        new, _, metrics = step(params, tx.init(params), gb)
    return jax.tree.map(np.asarray, new), {k: float(v) for k, v in metrics.items()}


def test_sharded_step_matches_single_device():
    p8, m8 = _step_once({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    p1, m1 = _step_once({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-6, abs=0)
    assert m8["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for name in p1:
        np.testing.assert_allclose(p8[name], p1[name], rtol=0, atol=1e-6, err_msg=name)
    assert max(np.abs(p1["q"] - np.asarray(init_model(mc.tiny(**TINY)).q[...])).ravel()) > 1e-3


def test_gradient_accumulation_is_exact():
    """4 microbatches of 2 rows give the token-weighted gradient of the whole batch."""
    p_full, m_full = _step_once({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], accum=1)
    p_acc, m_acc = _step_once({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], accum=4)
    assert m_acc["loss"] == pytest.approx(m_full["loss"], rel=1e-6)
    for name in p_full:
        np.testing.assert_allclose(p_acc[name], p_full[name], atol=1e-6, err_msg=name)


def test_packed_loss_equals_token_weighted_unpacked_loss():
    model = init_model(mc.tiny(**TINY), seed=1)
    rng = np.random.default_rng(3)
    lens = (11, 7, 9)
    seqs = [rng.integers(4, 512, size=n + 1).astype(np.int32) for n in lens]
    masks = [(rng.random(n) < 0.8).astype(np.float32) for n in lens]
    width = sum(lens) + 5
    packed = {k: np.zeros((1, width), np.int32) for k in ("inputs", "targets", "positions",
                                                          "segment_ids")}
    packed["loss_mask"] = np.zeros((1, width), np.float32)
    at = 0
    total, count = 0.0, 0.0
    for i, (s, m) in enumerate(zip(seqs, masks)):
        n = len(m)
        packed["inputs"][0, at:at + n], packed["targets"][0, at:at + n] = s[:-1], s[1:]
        packed["positions"][0, at:at + n] = np.arange(n)
        packed["segment_ids"][0, at:at + n] = i + 1
        packed["loss_mask"][0, at:at + n] = m
        at += n
        alone = {"inputs": s[None, :-1], "targets": s[None, 1:], "loss_mask": m[None]}
        loss_sum, weight, _ = losses.cross_entropy(model, alone, chunk_size=4)
        total, count = total + float(loss_sum), count + float(weight)
    loss_sum, weight, _ = losses.cross_entropy(model, packed, chunk_size=4)
    assert float(weight) == count
    assert float(loss_sum) / float(weight) == pytest.approx(total / count, rel=1e-5)
    unmasked = dict(packed)
    del unmasked["segment_ids"]
    leaky, _, _ = losses.cross_entropy(model, unmasked, chunk_size=4)
    assert abs(float(leaky) - float(loss_sum)) > 1e-3 * abs(float(loss_sum))


def test_chunked_logprobs_equal_full_logits():
    model = init_model(mc.tiny(**TINY), seed=2)
    b = _batches(1, bsz=2, seq=37)[0]
    logp, correct = losses.token_logprobs(model, b, chunk_size=8)
    logits = np.asarray(model(b["inputs"]))
    ref = jax.nn.log_softmax(logits)[np.arange(2)[:, None], np.arange(37)[None], b["targets"]]
    np.testing.assert_allclose(np.asarray(logp), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == b["targets"])


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    config = _config(tmp_path, steps=8)
    with pytest.raises(trainer.NonFiniteLossError, match="step 5"):
        trainer.train(config, _stage(_batches(8), poison_step=4))
    assert checkpointing.latest_step(str(tmp_path)) == 4
    model, _, _ = checkpointing.restore_model(str(tmp_path))
    assert all(np.isfinite(np.asarray(v)).all()
               for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_sigterm_saves_and_raises_preempted_so_nothing_after_the_stage_runs(tmp_path):
    """A SIGTERM during step 3 is answered with a checkpoint at step 3, then `Preempted`
    (SystemExit, status 0): a caller such as the recipe cannot go on as if the stage had
    finished. Rerunning resumes from step 3 and finishes."""
    batches = _batches(8)
    stage = _stage(batches)
    make_data = stage.make_data

    class TermAtThirdBatch:  # not a grain IterDataset, which the trainer would prefetch in a
        # thread: the signal comes as the trainer takes the third batch, i.e. during step 3
        def __init__(self, parent):
            self._parent = parent

        def __iter__(self):
            inner = iter(self._parent)

            class It(grain.DatasetIterator):
                def __init__(self):
                    super().__init__(inner)
                    self.count = 0

                def __next__(self):
                    self.count += 1
                    if self.count == 3:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return next(inner)

                def get_state(self):
                    return inner.get_state()

                def set_state(self, state):
                    inner.set_state(state)
            return It()

    def make_terminating_data(config, tok):
        data, stats = make_data(config, tok)
        return TermAtThirdBatch(data), stats
    stage.make_data = make_terminating_data
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(trainer.Preempted) as stop:
        trainer.train(_config(tmp_path, 8), stage)
    assert stop.value.code == 0 and stop.value.step == 3
    assert checkpointing.latest_step(str(tmp_path)) == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the trainer's handler is removed
    assert trainer.train(_config(tmp_path, 8), _stage(batches))["step"] == 8


def test_resume_is_bit_exact(tmp_path):
    """A run that stops at its step-4 checkpoint and is restarted ends with the same losses in
    metrics.jsonl and the same parameters as an uninterrupted run (bit-exact on CPU). The
    first half sees only 4 batches, so it stops there; the schedule is the same 8-step one.
    (The SIGKILL version of this, through the CLI, is in tests/stages/test_stages.py.)"""
    batches = _batches(8)
    straight = tmp_path / "straight"
    trainer.train(_config(straight, 8), _stage(batches))
    part = tmp_path / "part"
    trainer.train(_config(part, 8), _stage(batches[:4]))
    assert checkpointing.latest_step(str(part)) == 4
    trainer.train(_config(part, 8), _stage(batches))
    a, b = read_metrics(str(straight)), read_metrics(str(part))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    ma, _, _ = checkpointing.restore_model(str(straight))
    mb, _, _ = checkpointing.restore_model(str(part))
    for name in ("embed", "q", "down", "final_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(ma, name)[...]),
                                      np.asarray(getattr(mb, name)[...]))


def test_batches_are_made_in_a_background_thread_and_its_threads_stop(tmp_path):
    """A grain dataset's batches are made by a prefetch thread while the step computes (the
    main thread only takes them); the losses are those of the batches in order, and the
    prefetch thread is gone when the stage returns."""
    import threading
    batches = _batches(4)
    stage = _stage(batches)
    make_data = stage.make_data
    makers = set()

    def record(batch):
        makers.add(threading.current_thread().name)
        return batch

    def recorded_data(config, tok):
        data, stats = make_data(config, tok)
        return data.map(record), stats
    stage.make_data = recorded_data
    trainer.train(_config(tmp_path / "prefetched", 4), stage)
    assert makers and threading.main_thread().name not in makers
    assert not [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]
    # Same losses as the batches taken in the main thread (a plain iterable is not prefetched).
    plain = _stage(batches)
    plain_make = plain.make_data

    class Plain:
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            return iter(self.data)
    plain.make_data = lambda config, tok: (Plain(plain_make(config, tok)[0]),
                                           {"rows_per_epoch": 4})
    trainer.train(_config(tmp_path / "plain", 4), plain)
    losses_of = lambda d: [r["loss"] for r in read_metrics(str(d)) if "loss" in r]
    assert losses_of(tmp_path / "prefetched") == losses_of(tmp_path / "plain")
    assert len(losses_of(tmp_path / "plain")) == 4
