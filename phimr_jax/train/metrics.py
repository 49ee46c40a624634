"""Metrics: clu collections for averaging, `workdir/metrics.jsonl` always, TensorBoard when
TensorFlow is importable (clu's writers need it; the GPU image has none), console progress."""

from __future__ import annotations

import json
import logging
import os
import time
import jax
import numpy as np
from clu import metrics as clu_metrics

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


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
    """Writes one JSON object per logged step (process 0 only), and TensorBoard if possible."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            try:
                from clu import metric_writers  # imports TensorFlow
                self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError as e:
                log.warning("TensorBoard output skipped (%s); metrics go to %s", e, self.path)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs them identically)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            self._tb.write_scalars(step, {k: v for k, v in clean.items()
                                          if isinstance(v, (int, float))})
            self._tb.flush()


def _to_python(v):
    if isinstance(v, (np.ndarray, jax.Array)) or np.isscalar(v):
        arr = np.asarray(v)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return v


def read_metrics(workdir: str) -> list:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


class Progress:
    """Console progress: steps/s, tokens/s and ETA over the last log window."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self._t, self._step, self._tokens = time.time(), start_step, 0.0

    def add_tokens(self, n: float) -> None:
        self._tokens += n

    def report(self, step: int) -> dict:
        now = time.time()
        dt = max(now - self._t, 1e-9)
        sps = (step - self._step) / dt
        # Tokens are counted on this process's rows; every process has as many.
        out = {"steps_per_sec": sps, "tokens_per_sec": self._tokens * jax.process_count() / dt}
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        log.info("step %d/%d  %.2f steps/s  %.0f tokens/s  ETA %s", step, self.total, sps,
                 out["tokens_per_sec"], _fmt_eta(eta))
        self._t, self._step, self._tokens = now, step, 0.0
        return out


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
