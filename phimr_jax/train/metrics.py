"""Metrics of a run: clu collections average each log window; `MetricWriter` is the one place a
logged step fans out to `workdir/metrics.jsonl`, TensorBoard event files and (optionally)
Weights & Biases; `Progress` prints the console line; `Countdown` the progress of long loops.

TensorBoard: written with the `tensorboard` package's own event writer, so no TensorFlow is
needed (clu's writers import TensorFlow, even to reach their interface module)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import jax
import numpy as np
from clu import metrics as clu_metrics

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run id, so a resumed run logs into the same W&B run

# What the console line shows when a step logged it: (metric, label, format).
CONSOLE = (("loss", "loss", "{:.4f}"), ("grad_norm", "grad norm", "{:.3g}"),
           ("learning_rate", "lr", "{:.3g}"), ("preference_accuracy", "pref. acc", "{:.3f}"),
           ("rollout/reward_mean", "reward", "{:+.3f}"), ("rollout/accuracy", "accuracy", "{:.3f}"),
           ("rollout/temperature", "temperature", "{:.3f}"),
           ("rollout/responses_kept", "kept", "{:.0f}"))


class WindowAverage:
    """Averages each named scalar over the steps of a log window with a clu Collection.

    clu builds the collection as a dataclass, so names like "rewards/chosen" are mapped to
    identifiers on the way in and back on the way out."""

    def __init__(self, names):
        self._safe = {name: "m_" + "".join(c if c.isalnum() else "_" for c in name)
                      for name in names}
        self._back = {v: k for k, v in self._safe.items()}
        self._type = clu_metrics.Collection.create(
            **{safe: clu_metrics.Average.from_output(safe) for safe in self._safe.values()})
        self._window = None

    def add(self, values: dict) -> None:
        update = self._type.single_from_model_output(
            **{self._safe[k]: v for k, v in values.items()})
        self._window = update if self._window is None else self._window.merge(update)

    def compute_and_reset(self) -> dict:
        out = {self._back[k]: v for k, v in self._window.compute().items()}
        self._window = None
        return out


class MetricWriter:
    """Every logged step goes here, and from here to `metrics.jsonl`, TensorBoard and W&B
    (process 0 only): one record, the same scalars in all three.

    tensorboard: write `workdir/tensorboard/` event files. wandb: None / a `wandb.project` of ""
    = off (wandb is then never imported); else the W&B settings (`config_base.wandb_config`),
    with `run_config` (a dict) logged as the run's config."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb=None,
                 run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            self._tb = _TensorBoard(os.path.join(workdir, TENSORBOARD_DIR))
        if wandb is not None and wandb.get("project"):
            self._wandb = _WandB(workdir, wandb, run_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop what was logged after `step` (a resumed run re-logs it identically): the lines of
        metrics.jsonl; TensorBoard readers drop those events at a restart marker. W&B keeps a
        run's steps increasing, so it ignores the re-logged steps it already has."""
        if not self.enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        if self._tb is not None:
            self._tb.restart_after(step)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        scalars = {k: float(v) for k, v in clean.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            self._tb.write(step, scalars)
        if self._wandb is not None:
            self._wandb.write(step, scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


class _TensorBoard:
    """Scalar summaries in TensorBoard's event-file format, by the tensorboard package's own
    writer (a protobuf record file; no TensorFlow). Values are stored as float32
    (`simple_value`), as every TensorBoard scalar is."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event, self._summary = event_pb2, summary_pb2
        self._writer = EventFileWriter(logdir)

    def write(self, step: int, scalars: dict) -> None:
        summary = self._summary.Summary(value=[
            self._summary.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary))
        self._writer.flush()  # so a TensorBoard watching the run sees each step as it lands

    def restart_after(self, step: int) -> None:
        """TensorBoard's restart marker: readers drop the events of steps > `step` seen before
        it (the steps logged after the checkpoint a run resumes from)."""
        log_pb = self._event.SessionLog(status=self._event.SessionLog.START)
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step) + 1,
                                                 session_log=log_pb))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandB:
    """One W&B run per run directory: its id is kept in `workdir/wandb_run_id`, so a resumed
    run continues the same W&B run. W&B's own files go to `workdir/wandb/`."""

    def __init__(self, workdir: str, settings, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError("--config.wandb.project needs wandb: pip install -e '.[wandb]'") \
                from None
        id_path = os.path.join(workdir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits, unique per project
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        name = settings.get("name") or "/".join(os.path.abspath(workdir).split(os.sep)[-2:])
        self._run = wandb.init(project=settings["project"], entity=settings.get("entity") or None,
                               name=name, group=settings.get("group") or None,
                               mode=settings.get("mode") or None, dir=workdir, id=run_id,
                               resume="allow", config=run_config)
        log.info("W&B run %s (%s) in project %s", name, run_id, settings["project"])

    def write(self, step: int, scalars: dict) -> None:
        self._run.log(scalars, step=int(step))

    def close(self) -> None:
        self._run.finish()


def _to_python(v):
    if isinstance(v, (np.ndarray, jax.Array)) or np.isscalar(v):
        arr = np.asarray(v)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return v


def read_metrics(workdir: str) -> list:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


class Progress:
    """The console line of a logged step: the metrics users watch (CONSOLE), then steps/s,
    tokens/s and ETA over the last log window."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self._t, self._step, self._tokens = time.time(), start_step, 0.0

    def add_tokens(self, n: float) -> None:
        self._tokens += n

    def report(self, step: int, values: dict | None = None) -> dict:
        """Log the line for `step` (with whichever CONSOLE metrics `values` has); returns the
        speeds, for metrics.jsonl."""
        now = time.time()
        dt = max(now - self._t, 1e-9)
        sps = (step - self._step) / dt
        # Tokens are counted on this process's rows; every process has as many.
        out = {"steps_per_sec": sps, "tokens_per_sec": self._tokens * jax.process_count() / dt}
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        log.info("step %d/%d  %s%.2f steps/s  %.0f tokens/s  ETA %s", step, self.total,
                 console_fields(values or {}), sps, out["tokens_per_sec"], _fmt_eta(eta))
        self._t, self._step, self._tokens = now, step, 0.0
        return out


def console_fields(values: dict) -> str:
    """"loss 2.3141  grad norm 1.52  lr 0.002  " for the CONSOLE metrics in `values`."""
    return "".join(f"{label} {fmt.format(values[key])}  " for key, label, fmt in CONSOLE
                   if key in values)


def log_evaluation(step: int, values: dict) -> None:
    """One console line with a step's evaluation results (the `eval/` metrics)."""
    shown = {k[len("eval/"):]: v for k, v in values.items() if k.startswith("eval/")}
    if shown:
        log.info("step %d  eval: %s", step, "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))


class Countdown:
    """Progress of a long loop over `total` items (an evaluation's problems): logs "done /
    total", the elapsed time and an ETA at each `update`."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self._start = what, total, time.time()

    def update(self, done: int) -> str:
        elapsed = time.time() - self._start
        eta = elapsed * (self.total - done) / done if done else float("inf")
        line = (f"{self.what}: {done} / {self.total} ({_fmt_eta(elapsed)} elapsed, "
                f"ETA {_fmt_eta(eta)})")
        log.info("%s", line)
        return line


def _fmt_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def plot_panels(path: str, panels, cols: int = 0) -> str:
    """One PNG, one panel per (title, [(label or None, metrics rows, key), ...]): each series is
    `key` against "step" over the rows that have it (rows as `read_metrics` returns them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = cols or len(panels)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for label, rows, key in series:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        if any(label for label, _, _ in series):
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
