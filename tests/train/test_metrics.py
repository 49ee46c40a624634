"""The one metric fan-out: metrics.jsonl, TensorBoard event files (read back with tensorboard's
own reader, no TensorFlow) and W&B (offline mode, no network); the console line."""

import glob
import json
import logging
import os
import struct
import sys

import numpy as np
import pytest

from phimr_jax.train import trainer
from phimr_jax.train import metrics
from phimr_jax.train.metrics import (TENSORBOARD_DIR, Countdown, MetricWriter, console_fields,
                                      read_metrics)
from tests.train.test_trainer import _batches, _config, _stage


def tensorboard_scalars(workdir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard shows them (restart markers applied)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(os.path.join(str(workdir), TENSORBOARD_DIR),
                              size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_matches_metrics(workdir) -> dict:
    """Every scalar of metrics.jsonl is in TensorBoard at its step with its value (as float32,
    TensorBoard's scalar type), and TensorBoard holds nothing else."""
    want = {}
    for row in read_metrics(str(workdir)):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                want.setdefault(key, []).append((row["step"], np.float32(value)))
    got = tensorboard_scalars(workdir)
    assert sorted(got) == sorted(want)
    for key in want:
        assert [(s, np.float32(v)) for s, v in got[key]] == want[key], key
    return got


@pytest.fixture
def no_tensorflow_no_wandb(monkeypatch):
    """Any `import tensorflow` / `import wandb` fails: what works here needs neither."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)


def test_writer_fans_out_and_a_resume_replaces_the_steps_after_its_checkpoint(
        tmp_path, no_tensorflow_no_wandb):
    writer = MetricWriter(str(tmp_path))
    writer.write(0, {"data/rows_per_epoch": 1311, "eval/accuracy": 0.25,
                     "data/files": ["a.jsonl"]})  # a list: in metrics.jsonl only
    for step in range(1, 7):
        writer.write(step, {"loss": 3.0 / step, "grad_norm": np.float32(1.5),
                            "rollout/reward_mean": -1 + step / 7, "rollout/temperature": 1.0})
    writer.close()
    # A killed run resumes from its step-4 checkpoint and logs steps 5-8 again, differently.
    resumed = MetricWriter(str(tmp_path))
    resumed.truncate_after(4)
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 + step, "grad_norm": 2.0,
                             "rollout/reward_mean": 0.5, "rollout/temperature": 0.6})
    resumed.close()
    got = assert_tensorboard_matches_metrics(tmp_path)
    assert [s for s, _ in got["loss"]] == list(range(1, 9))
    assert got["loss"][5] == (6, 16.0)  # the resumed run's step 6, not the lost one's
    assert got["eval/accuracy"] == [(0, 0.25)] and "data/files" not in got
    assert read_metrics(str(tmp_path))[0]["data/files"] == ["a.jsonl"]


class _RolloutLikeIterator:
    """The trainer's batches with per-step metrics, as the RL rollout iterator gives them."""

    def __init__(self, it):
        self._it, self._step = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        self._step += 1
        return next(self._it)

    def get_state(self):
        return self._it.get_state()

    def pop_metrics(self):
        return {"rollout/reward_mean": -1 + self._step / 4, "rollout/accuracy": self._step / 8,
                "rollout/temperature": 1.0 - 0.05 * self._step,
                "rollout/responses_kept": float(8 * self._step)}


def _watched_stage(batches):
    stage = _stage(batches)
    make_data = stage.make_data

    def with_rollout_metrics(config, tokenizer):
        dataset, stats = make_data(config, tokenizer)
        return _RolloutLikeIterator(iter(dataset)), stats

    stage.make_data = with_rollout_metrics
    stage.evaluate = lambda model, tokenizer, config: {"eval/accuracy": 0.125,
                                                       "eval/finished": 0.5}
    return stage


def test_trainer_logs_every_scalar_to_tensorboard_and_the_console(
        tmp_path, caplog, no_tensorflow_no_wandb):
    config = _config(tmp_path, 4)
    config.tensorboard = True
    config.eval_every_steps, config.log_every_steps = 2, 2
    with caplog.at_level(logging.INFO):
        trainer.train(config, _watched_stage(_batches(4)))
    got = assert_tensorboard_matches_metrics(tmp_path)
    for key in ("loss", "grad_norm", "learning_rate", "steps_per_sec", "eval/accuracy",
                "rollout/reward_mean", "rollout/responses_kept", "data/rows_per_epoch"):
        assert key in got, key
    assert [s for s, _ in got["eval/accuracy"]] == [2, 4]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 4")]
    step_line = next(ln for ln in lines if "/4" in ln)
    # The window of steps 3-4: means of the iterator's values at those steps.
    for shown in ("loss ", "grad norm ", "lr ", "reward -0.125", "accuracy 0.438",
                  "temperature 0.825", "kept 28", "steps/s", "tokens/s", "ETA"):
        assert shown in step_line, (shown, step_line)
    assert "step 4  eval: accuracy 0.125  finished 0.5" in lines


def test_console_fields_show_what_users_watch():
    assert console_fields({"loss": 2.31412, "grad_norm": 1.5234, "learning_rate": 2e-4,
                           "weight": 7.0}) == "loss 2.3141  grad norm 1.52  lr 0.0002  "
    rl = console_fields({"rollout/reward_mean": -0.25, "rollout/accuracy": 0.375,
                         "rollout/temperature": 0.8, "rollout/responses_kept": 48.0})
    assert rl == "reward -0.250  accuracy 0.375  temperature 0.800  kept 48  "


def test_countdown_shows_done_of_total_and_an_eta(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "time", lambda: now[0])
    progress = Countdown("sampled prompts", 500)
    now[0] += 30.0
    assert progress.update(100) == "sampled prompts: 100 / 500 (0:00:30 elapsed, ETA 0:02:00)"
    now[0] += 90.0
    assert progress.update(500) == "sampled prompts: 500 / 500 (0:02:00 elapsed, ETA 0:00:00)"


# ---------------------------------------------------------------------------- W&B
def _wandb_records(run_file: str):
    """The records of a W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (crc32c, length, type) and a wandb_internal Record protobuf,
    after a 7-byte ":W&B" file header. (wandb itself has no public reader.)"""
    from wandb.proto import wandb_internal_pb2
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_logs_the_same_scalars_and_the_run_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, 4)
    config.wandb.project, config.wandb.mode = "phimr-test", "offline"
    trainer.train(config, _stage(_batches(4)))
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    run_id = open(tmp_path / "wandb_run_id").read().strip()
    assert run_files[0].endswith(f"run-{run_id}.wandb")
    history, run_config = {}, {}
    for record in _wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items()
                                           if not k.startswith("_")}
        elif kind in ("run", "config"):  # the config comes with the run, updates after it
            updates = (record.run.config if kind == "run" else record.config).update
            run_config.update({i.key: json.loads(i.value_json) for i in updates})
    want = {row.pop("step"): row for row in read_metrics(str(tmp_path))}
    assert history == want
    assert run_config["total_steps"] == 4 and run_config["optim"]["learning_rate"] == 1e-2
    assert run_config["wandb"]["project"] == "phimr-test"
    # The run directory logged again (as a resumed run does): the same W&B run.
    MetricWriter(str(tmp_path), tensorboard=False, wandb=config.wandb).close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 2 and all(r.endswith(f"run-{run_id}.wandb") for r in runs)
