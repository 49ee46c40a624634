"""The one trainer every stage uses.

A stage supplies a `Stage`: its data (a grain IterDataset of per-process numpy batches), its
loss (`loss_fn(model, batch) -> (loss_sum, weight, metric_sums)`, normalised by the trainer with
`weight_fn(batch)` over the whole global batch, so gradient accumulation is exact), and an
optional evaluation. The trainer owns everything else:

- mesh from `config.mesh`, parameters sharded by the `config.sharding_rules` table; optimizer
  state created by a jitted `tx.init` with explicit out-shardings (never on one device);
- initialisation: resume from `workdir` if it has checkpoints, else `init.checkpoint` (another
  run), else `init.hf_dir`, else a fresh model from `model.preset`;
- a jitted step: `grad_accum_steps` microbatches under `lax.scan`, clipping + AdamW (optax),
  params/opt state donated; mixed precision by the model's dtype policy (f32 master weights);
- Orbax CheckpointManager (every N steps, keep K, async): params, opt_state, train_state (step,
  seed), the grain iterator (one file per process) and run_info; on start the latest checkpoint
  is restored, so a killed run continues bit-exactly; SIGTERM saves and exits the process
  (status 0, `Preempted`: a recipe does not go on to its next stage); a
  non-finite loss stops the run before anything non-finite is saved;
- metrics averaged over each log window with clu; each logged step goes through one
  `MetricWriter` to `metrics.jsonl`, TensorBoard and (optional) W&B, and one console line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from typing import Callable, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from phimr_jax.model import sharding
from phimr_jax.model.actor_critic import PARAM_LAYOUTS, abstract_for_layout
from phimr_jax.model.config import ModelConfig
from phimr_jax.model.dtypes import resolve_compute_dtype
from phimr_jax.model.phi3 import abstract_model
from phimr_jax.train import checkpointing
from phimr_jax.train.config_base import mesh_and_rules
from phimr_jax.train.metrics import MetricWriter, Progress, WindowAverage, log_evaluation
from phimr_jax.train.optim import make_optimizer, schedule
from phimr_jax.train.state import _global_batch, _init_model, _opt_shardings, with_model_config

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""

    exit_code = 3  # main.py prints the message and exits with this status.


class Preempted(SystemExit):
    """Raised once a SIGTERM (a preemption, a scheduler's stop) has been answered with a saved
    checkpoint: the process was asked to stop, so nothing after the stage may run. A recipe
    must not mark the half-trained stage DONE and go on to the next stage from it (it did: a
    SIGTERM at step 31 of 600 gave stage 2 a 31-step model). Exits with status 0, as a clean
    stop; rerunning the command resumes the stage from the saved step."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


@dataclasses.dataclass
class Stage:
    """What one stage of the recipe contributes to the shared trainer."""

    name: str
    # (config, tokenizer) -> (grain IterDataset of per-process batches, stats dict). Stats with
    # "rows_per_epoch" let total_steps=-1 be derived from data.num_epochs.
    make_data: Callable
    loss_fn: Callable  # (model, batch) -> (loss_sum, weight, {metric: sum})
    weight_fn: Callable  # (batch) -> total weight of the global batch
    evaluate: Optional[Callable] = None  # (model, tokenizer, config) -> {metric: value}
    tokenizer_fn: Optional[Callable] = None  # (config, inherited_dir) -> (tokenizer, dir)
    # (model, tokenizer, config, resumed) -> None: runs before make_data, with the initial
    # model (abstract when resumed), e.g. DPO scoring its pairs under the frozen reference.
    prepare: Optional[Callable] = None
    # What the trainer optimises, built from the policy model: "policy" (the model itself) or
    # "actor_critic" (policy + value model, phimr_jax/model/actor_critic.py). Saved in run_info
    # so every later reader can restore the policy out of the run's parameter tree.
    param_layout: str = "policy"


# The batch iterator may also implement (duck-typed; the RL rollout iterator does):
#   use_params(graphdef, params, step): called before each next() with the current parameters,
#     so it can sample rollouts from the policy being trained (no weight copies);
#   pop_metrics() -> {name: float}: merged into that step's logged metrics (same keys each step);
#   at_checkpoint_boundary -> bool: False while its state could not be restored (e.g. between
#     the optimisation steps of one rollout batch); periodic and SIGTERM saves wait for True.


class _IteratorSnapshot:
    """The grain iterator's state frozen at save time (saves are asynchronous)."""

    def __init__(self, state):
        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


def _manager(workdir: str, config: ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints or None, create=True,
        enable_async_checkpointing=config.async_checkpoint)
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "train_state": ocp.JsonCheckpointHandler(),
                "run_info": ocp.JsonCheckpointHandler(),
                "data_iter": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir), options=options,
                                 item_handlers=handlers)


def _make_step(graphdef, stage: Stage, tx, accum: int):
    def step(params, opt_state, batch):
        weight = jnp.maximum(stage.weight_fn(batch), 1e-9)
        micro = jax.tree.map(
            lambda x: sharding.constrain(x.reshape(accum, x.shape[0] // accum, *x.shape[1:]),
                                         (None, "batch", "length")[:x.ndim + 1]), batch)

        def loss_of(p, mb):
            loss_sum, _, sums = stage.loss_fn(nnx.merge(graphdef, p), mb)
            return loss_sum / weight, sums

        def micro_step(carry, mb):
            g_acc, m_acc = carry
            (_, sums), g = jax.value_and_grad(loss_of, has_aux=True)(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, sums)), None

        mb0 = jax.tree.map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda p, mb: loss_of(p, mb)[1], params, mb0)
        zeros = (jax.tree.map(jnp.zeros_like, params),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
        (grads, sums), _ = jax.lax.scan(micro_step, zeros, micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {k: v / weight for k, v in sums.items()}
        metrics.update(grad_norm=optax.tree.norm(grads), weight=weight)
        return params, opt_state, metrics
    return step


def _resolve_total_steps(config: ConfigDict, stats: dict) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    rows = stats.get("rows_per_epoch")
    if not rows:
        raise ValueError("total_steps=-1 needs the data's rows_per_epoch; set --config.total_steps")
    return max(1, int(np.ceil(config.data.num_epochs * rows / config.data.global_batch_size)))


def train(config: ConfigDict, stage: Stage) -> dict:
    """Run (or resume) `stage` in `config.workdir`; returns the last logged metrics."""
    if not config.workdir:
        raise ValueError("missing required option --config.workdir=...")
    workdir = os.path.abspath(config.workdir)
    mesh, rules = mesh_and_rules(config)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        return _train(config, stage, workdir, mesh, rules)


def _model_for_run(config, mngr, mesh, rules):
    """(model, tokenizer_dir, init description, resume step or None). On resume the model is
    abstract (its parameters come from the checkpoint) and keeps the run's dtype policy."""
    resume_step = mngr.latest_step()
    if resume_step is None:
        model, tokenizer_dir, source = _init_model(config, mesh, rules)
        kernel = {"attention_impl": config.model.attention_impl} \
            if config.model.get("attention_impl") else {}
        if config.model.get("attention_block_size"):
            kernel["attention_block_size"] = config.model.attention_block_size
        dtype = resolve_compute_dtype(config.model.dtype)
        if config.model.dtype == "auto":
            log.info("compute dtype auto: %s on this %s", dtype, jax.default_backend())
        model = with_model_config(model, dtype=dtype,
                                  remat_policy=config.model.remat_policy,
                                  scan_layers=bool(config.model.get("scan_layers", True)),
                                  **kernel)
        return model, tokenizer_dir, source, None
    info = mngr.restore(resume_step, args=ocp.args.Composite(
        run_info=ocp.args.JsonRestore()))["run_info"]
    model = abstract_model(ModelConfig.from_dict(info["model"]))
    return model, info.get("tokenizer_dir", ""), info.get("init", ""), resume_step


def _train(config, stage, workdir, mesh, rules) -> dict:
    mngr = _manager(workdir, config)
    model, tokenizer_dir, source, resume_step = _model_for_run(config, mngr, mesh, rules)
    tokenizer, tokenizer_dir = stage.tokenizer_fn(config, tokenizer_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab is "
                         f"{model.config.vocab_size}")
    if stage.prepare is not None:
        stage.prepare(model, tokenizer, config, resume_step is not None)
    dataset, stats = stage.make_data(config, tokenizer)
    total_steps = _resolve_total_steps(config, stats)
    tx = make_optimizer(config.optim, total_steps)

    build, policy_of = PARAM_LAYOUTS[stage.param_layout]
    graphdef, params_state = nnx.split(build(model), nnx.Param)
    abstract_state = nnx.state(abstract_for_layout(model.config, stage.param_layout), nnx.Param)
    abstract_params = nnx.to_pure_dict(abstract_state)
    params_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, rules))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = _opt_shardings(abstract_opt, params_sh, abstract_params, mesh)
    if isinstance(dataset, grain.IterDataset):
        # Batches are made (featurised, packed, batched) in a background thread while the
        # step computes: stage 1's packing took ~16 ms of the main thread per step, with
        # the computation waiting on it (BENCHMARKS.md, "Session 21"). Same batches, and
        # the iterator state saved with a checkpoint is that of the last batch taken.
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=2)
    data_iter = iter(dataset)
    info = {"model": model.config.to_dict(), "stage": stage.name, "tokenizer_dir": tokenizer_dir,
            "init": source, "data_stats": stats, "param_layout": stage.param_layout}
    writer = MetricWriter(workdir, tensorboard=config.tensorboard, wandb=config.get("wandb"),
                          run_config=config.to_dict())

    if resume_step is not None:
        restored = mngr.restore(resume_step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(checkpointing.with_shardings(abstract_params, params_sh)),
            opt_state=ocp.args.StandardRestore(checkpointing.with_shardings(abstract_opt, opt_sh)),
            train_state=ocp.args.JsonRestore(),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        params, opt_state = restored["params"], restored["opt_state"]
        start_step = int(restored["train_state"]["step"])
        writer.truncate_after(start_step)
        log.info("resumed %s from %s step %d", stage.name, workdir, start_step)
    else:
        params = nnx.to_pure_dict(params_state)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        start_step = 0
        log.info("%s: initialised from %s; %d steps in %s", stage.name, source, total_steps,
                 workdir)
        start_values = {f"data/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        if config.get("eval_at_start") and stage.evaluate:
            start_values.update(stage.evaluate(policy_of(nnx.merge(graphdef, params)),
                                               tokenizer, config))
            log_evaluation(0, start_values)
        writer.write(0, start_values)

    accum = int(config.optim.grad_accum_steps)
    if config.data.global_batch_size % (accum * jax.process_count()):
        raise ValueError("data.global_batch_size must divide into grad_accum_steps x processes")
    _log_memory_estimate(config, model.config, mesh, accum, stage.param_layout)
    step_fn = sharding.RunsTogether(jax.jit(_make_step(graphdef, stage, tx, accum),
                                            donate_argnums=(0, 1),
                                            out_shardings=(params_sh, opt_sh, None)))
    loop = _Loop(config, stage, mngr, writer, data_iter, info, tokenizer, graphdef, stats,
                 schedule(config.optim, total_steps), total_steps, workdir, policy_of)
    return loop.run(step_fn, params, opt_state, start_step, mesh, rules)


def _log_memory_estimate(config, model_config, mesh, accum: int, layout: str) -> dict:
    """Print the per-device memory estimate of a step (train/memory.py) before training."""
    from phimr_jax.train.memory import estimate, format_estimate
    if not config.data.get("seq_len"):  # a stage whose rows have no fixed length
        return {}
    shape = dict(mesh.shape)
    batch_devices = shape.get("data", 1) * shape.get("fsdp", 1)
    est = estimate(model_config, seq_len=int(config.data.seq_len),
                   batch_per_device=max(1, config.data.global_batch_size // accum // batch_devices),
                   devices=shape.get("fsdp", 1) * shape.get("tensor", 1),
                   param_dtype=config.model.param_dtype, compute_dtype=model_config.dtype,
                   remat_policy=config.model.remat_policy,
                   chunk_size=int(config.get("loss", {}).get("chunk_size", 1024)),
                   grad_accum_steps=accum)
    if layout == "actor_critic":  # a second decoder (the critic): twice the weights and layers
        est = {k: v * (1 if k == "logits_chunk" else 2) for k, v in est.items() if k != "total"}
        est["total"] = sum(est.values())
    log.info("%s", format_estimate(est, "estimated memory per device (train/memory.py)"))
    return est


class _Loop:
    """The step loop: batches in, metrics out, checkpoints, SIGTERM and non-finite checks."""

    def __init__(self, config, stage, mngr, writer, data_iter, info, tokenizer, graphdef, stats,
                 lr_at, total_steps, workdir, policy_of):
        self.config, self.stage, self.mngr, self.writer = config, stage, mngr, writer
        self.data_iter, self.info, self.tokenizer, self.graphdef = data_iter, info, tokenizer, graphdef
        self.stats, self.lr_at, self.total_steps, self.workdir = stats, lr_at, total_steps, workdir
        self.policy_of = policy_of
        self.stop_requested = False
        self.save_pending = False  # a periodic/SIGTERM save waiting for a checkpoint boundary

    def save(self, step, params, opt_state):
        self.mngr.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            train_state=ocp.args.JsonSave({"step": step, "seed": self.config.seed}),
            data_iter=grain.checkpoint.CheckpointSave(
                _IteratorSnapshot(self.data_iter.get_state())),
            run_info=ocp.args.JsonSave(self.info)))

    def log_values(self, step, window, progress) -> dict:
        values = {k: float(v) for k, v in window.compute_and_reset().items()}
        if not all(np.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(
                f"non-finite metrics at step {step} ({values}); stopped, last good checkpoint "
                f"step {self.mngr.latest_step()} kept in {self.workdir}")
        values["learning_rate"] = float(self.lr_at(step - 1))
        if self.stats.get("rows_per_epoch"):
            values["epoch"] = step * self.config.data.global_batch_size / \
                self.stats["rows_per_epoch"]
        values.update(progress.report(step, values))
        return values

    def run(self, step_fn, params, opt_state, step, mesh, rules) -> dict:
        config, total = self.config, self.total_steps
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        window, last, preempted_at = None, {}, None
        progress = Progress(total, step)
        try:
            use_params = getattr(self.data_iter, "use_params", None)
            pop_metrics = getattr(self.data_iter, "pop_metrics", None)
            while step < total:
                try:
                    if use_params is not None:
                        use_params(self.graphdef, params, step)
                    local = next(self.data_iter)
                except StopIteration:
                    log.warning("data exhausted at step %d of %d; saving and stopping",
                                step, total)
                    if self.mngr.latest_step() != step:
                        self.save(step, params, opt_state)
                    break
                params, opt_state, metrics = step_fn(params, opt_state,
                                                     _global_batch(local, mesh, rules))
                step += 1
                if pop_metrics is not None:
                    metrics = {**metrics, **pop_metrics()}
                if window is None:
                    window = WindowAverage(sorted(metrics))
                window.add(metrics)
                progress.add_tokens(float(np.sum(local.get("segment_ids", local["inputs"]) > 0)))
                is_last = step == total
                if jax.process_count() > 1 and self.mngr.reached_preemption(step):
                    self.stop_requested = True
                stop = self.stop_requested
                self.save_pending |= stop or step % config.checkpoint_every_steps == 0
                boundary = getattr(self.data_iter, "at_checkpoint_boundary", True)
                checkpoint_now = is_last or (self.save_pending and boundary)
                preempted = stop and checkpoint_now
                eval_now = bool(self.stage.evaluate and config.eval_every_steps and (
                    is_last or step % config.eval_every_steps == 0))
                if step % config.log_every_steps == 0 or checkpoint_now or eval_now:
                    values = self.log_values(step, window, progress)
                    if eval_now:
                        model = self.policy_of(nnx.merge(self.graphdef, params))
                        values.update(self.stage.evaluate(model, self.tokenizer, config))
                        log_evaluation(step, values)
                    self.writer.write(step, values)
                    last = values
                if checkpoint_now:
                    self.save(step, params, opt_state)
                    self.save_pending = False
                if preempted:
                    self.mngr.wait_until_finished()
                    log.warning("SIGTERM: saved step %d and stopping", step)
                    preempted_at = step
                    break
        finally:
            self.mngr.wait_until_finished()
            self.mngr.close()
            self.writer.close()
            close = getattr(self.data_iter, "close", None)
            if close is not None:  # stops the prefetch threads
                close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if preempted_at is not None:
            raise Preempted(preempted_at)
        return {"step": step, **last}

    def _on_sigterm(self, *_):
        self.stop_requested = True


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
