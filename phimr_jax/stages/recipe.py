"""Stage `recipe`: the training stages in order, each from the previous one's checkpoint, each
evaluated with the eval harness on the same held-out problems; a paper-style table and plots.

Layout under `workdir`: one run directory per stage (`midtrain/`, `sft/`, `dpo/`, `rl/`), each
with a `DONE` marker once finished (a rerun skips it; an unfinished stage resumes from its own
latest checkpoint), `recipe.md` and `recipe.json` (held-out pass@1 after each stage, starting
with the model stage 1 starts from), `loss_per_stage.png`, `rl_reward_temperature.png`, and
`hf_model/`: the last stage exported for transformers, with the tokenizer and chat template,
and `demo_data/<digest>/`: the demo corpus every stage trains on, generated once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from ml_collections import ConfigDict

from phimr_jax.train import checkpointing

log = logging.getLogger(__name__)
RUNNERS = {"midtrain": "phimr_jax.stages.midtrain", "sft": "phimr_jax.stages.sft",
           "dpo": "phimr_jax.stages.dpo", "rl": "phimr_jax.stages.rl.stage"}


def _run_stage(name: str, config: ConfigDict) -> None:
    import importlib
    importlib.import_module(RUNNERS[name]).run(config)


def _evaluate(config: ConfigDict, run_dir: str, dataset: str, label: str) -> dict:
    from phimr_jax.evaluation.harness import run as run_eval
    ev = ConfigDict(config.eval.to_dict())
    ev.checkpoint, ev.dataset, ev.workdir = run_dir, dataset, run_dir
    ev.mesh, ev.sharding_rules = config.mesh, config.sharding_rules
    ev.seed = config.seed
    out = os.path.join(run_dir, "eval", f"{ev.name}.json")
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    else:  # only process 0 writes the file: every process uses the returned result
        result = run_eval(ev)
    summary = result["summary"]
    return {"stage": label, "pass@1": summary["pass@1"], "stderr": summary["stderr"],
            "problems": summary["problems"], "k": summary["samples_per_problem"],
            "mean_tokens": summary["mean_tokens"],
            "by_difficulty": summary.get("pass@1_by_difficulty") or {},
            "pass@k": summary.get("pass@k"),
            "by_difficulty_at_k": summary.get("pass@k_by_difficulty") or {},
            "per_problem": [p["pass@1"] for p in result["problems"]]}


def paired_change(before: list, after: list) -> tuple[float, float]:
    """(mean change of per-problem pass@1, its standard error) between two evaluations of the
    same problems: the paired SE is far below either table SE, since most of a pass@1's
    uncertainty is which problems were drawn, and both rows share them."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def table(rows: list) -> list:
    """The markdown table: pass@1 ± SE per stage, the paired change from the previous row,
    pass@k (k = samples per problem), and per difficulty level (when the problems have one)
    pass@1 / pass@k."""
    levels = sorted({k for r in rows for k in r["by_difficulty"]}, key=str)
    lines = ["| model | held-out pass@1 (%) | ± SE | change vs previous row (± paired SE) | "
             "pass@k (%) | " + "".join(f"level {k} pass@1 / @k | " for k in levels)
             + "problems | k | mean tokens |",
             "|---|---|---|---|---|" + "---|" * len(levels) + "---|---|---|"]
    for i, r in enumerate(rows):
        change = ""
        if i:
            d, se = paired_change(rows[i - 1]["per_problem"], r["per_problem"])
            change = f"{100 * d:+.1f} ± {100 * se:.1f}"
        at_k = r.get("by_difficulty_at_k") or {}
        per_level = "".join(
            (f"{100 * r['by_difficulty'][k]:.0f}" + (f" / {100 * at_k[k]:.0f}" if k in at_k
                                                     else "") + " | ")
            if k in r["by_difficulty"] else " | " for k in levels)
        pass_k = "" if r.get("pass@k") is None else f"{100 * r['pass@k']:.1f}"
        lines.append(f"| {r['stage']} | {100 * r['pass@1']:.1f} | {100 * r['stderr']:.1f} | "
                     f"{change} | {pass_k} | {per_level}{r['problems']} | {r['k']} | "
                     f"{r['mean_tokens']:.0f} |")
    return lines


def _plot(workdir: str, order) -> str:
    from phimr_jax.train.metrics import plot_panels, read_metrics
    panels = [(f"{name} loss", [(None, read_metrics(os.path.join(workdir, name)), "loss")])
              for name in order]
    return plot_panels(os.path.join(workdir, "loss_per_stage.png"), panels)


def _plot_rl(workdir: str) -> str:
    """rl_reward_temperature.png: RL rollout reward / accuracy and the annealed temperature."""
    from phimr_jax.train.metrics import plot_panels, read_metrics
    rows = read_metrics(os.path.join(workdir, "rl"))
    panels = [("RL rollouts", [("mean reward", rows, "rollout/reward_mean"),
                               ("accuracy", rows, "rollout/accuracy")]),
              ("sampling temperature", [(None, rows, "rollout/temperature")])]
    return plot_panels(os.path.join(workdir, "rl_reward_temperature.png"), panels)


def _export(config: ConfigDict, root: str) -> str:
    """The last stage's checkpoint as an HF directory with tokenizer + chat template."""
    from phimr_jax.train.convert import run_export
    out = os.path.join(root, config.export_dir)
    if not os.path.exists(os.path.join(out, "config.json")):
        run_export(ConfigDict({
            "workdir": os.path.join(root, config.order[-1]), "out_dir": out, "step": -1,
            "dtype": "", "max_shard_size_mb": 5120, "rope_format": "auto", "tokenizer_dir": "",
            "mesh": config.mesh, "sharding_rules": config.sharding_rules}))
    return out


def run(config: ConfigDict) -> list:
    if not config.workdir:
        raise ValueError("missing required option --config.workdir=...")
    root = os.path.abspath(config.workdir)
    for name in config.order:
        if name not in RUNNERS:
            raise ValueError(f"unknown stage {name!r} in order; known: {sorted(RUNNERS)}")
        stage = config.stages[name]
        stage.workdir, stage.seed = os.path.join(root, name), config.seed
        if stage.get("data") and stage.data.get("demo") and not stage.data.get("demo_dir"):
            stage.data.demo_dir = os.path.join(root, "demo_data")  # one corpus for all stages
    first = config.stages[config.order[0]]
    dataset = config.eval.dataset or _demo_heldout(first)
    evals = _Evaluations(background=bool(config.get("eval_in_background"))
                         and jax.process_count() == 1)
    try:
        rows = _run_stages(config, root, first, dataset, evals)
    except BaseException:  # a failed or preempted stage: no queued evaluation starts
        evals.abandon()
        raise
    exported = _export(config, root) if config.export_dir else ""
    lines = table(rows)
    if jax.process_index() == 0:
        with open(os.path.join(root, "recipe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(root, "recipe.json"), "w") as f:
            json.dump(rows, f, indent=2)
        _plot(root, config.order)
        if "rl" in config.order:
            _plot_rl(root)
        print("\n".join(lines))
        if exported:
            print(f"final model (HF format, with tokenizer and chat template): {exported}")
    return rows


def _demo_heldout(first: ConfigDict) -> str:
    """The held-out file of the demo corpus stage 1 trains on (generated now if need be)."""
    if not (first.get("data") and first.data.get("demo")):
        raise ValueError("the held-out problems: set --config.eval.dataset=... (stage 1 does "
                         "not train on the demo corpus, whose held-out file is the default)")
    from phimr_jax.stages.distill import demo_paths
    return demo_paths(first)["heldout"]


def _run_stages(config: ConfigDict, root: str, first: ConfigDict, dataset: str,
                evals) -> list:
    """Each stage in order (skipping finished ones), its evaluation queued after it."""
    previous, started = "", False
    for name in config.order:
        stage = config.stages[name]  # workdir, seed and demo_dir: set by `run`
        stage.mesh, stage.sharding_rules = config.mesh, config.sharding_rules
        _share_wandb(config, stage, root)
        if previous:
            stage.init.checkpoint = previous
        done = os.path.join(stage.workdir, "DONE")
        if os.path.exists(done):
            log.info("recipe: %s already finished, skipping", name)
        else:
            log.info("recipe: running %s in %s", name, stage.workdir)
            _run_stage(name, stage)
            if jax.process_index() == 0:
                open(done, "w").close()
        previous = stage.workdir
        if not started and config.get("eval_start_row", True):
            # The start model's row, once stage 1 has made the tokenizer it needs.
            start = _start_run(config, root, first)
            if start:
                evals.add(_evaluate, config, start, dataset, "start (before stage 1)")
        started = True
        evals.add(_evaluate, config, stage.workdir, dataset, f"+ {name}")
    return evals.wait()


class _Evaluations:
    """The held-out evaluations, in stage order, each logged as its row is ready. In the
    background (`eval_in_background`, one process only), a worker thread runs them one at a
    time while the next stage trains: on 2 CPU cores a training step leaves one core idle
    during its single-threaded elementwise kernels, and two computations at once got 25% more
    done than one after the other (BENCHMARKS.md, "Session 20"). Every row is the same
    computation either way (same checkpoint, seed and compiled sampler); an evaluation that
    fails stops the recipe at the next stage boundary, or at the end."""

    def __init__(self, background: bool):
        self.rows: list = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="recipe-eval") \
            if background else None
        self._jobs: list = []

    def add(self, evaluate, *args) -> None:
        def job():
            self.rows.append(evaluate(*args))
            _log_row(self.rows)
        for done in [j for j in self._jobs if j.done()]:
            done.result()  # re-raises an evaluation's error here
        if self._pool is None:
            job()
        else:
            self._jobs.append(self._pool.submit(job))

    def abandon(self) -> None:
        """Queued evaluations never start; a running one finishes (a thread cannot be
        stopped) before the process exits."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> list:
        for job in self._jobs:
            job.result()
        if self._pool is not None:
            self._pool.shutdown()
        return self.rows


def _log_row(rows: list) -> None:
    """The newest row of the table as one line, as soon as its evaluation is done."""
    r = rows[-1]
    change = ""
    if len(rows) > 1:
        d, se = paired_change(rows[-2]["per_problem"], r["per_problem"])
        change = f", {100 * d:+.1f} ± {100 * se:.1f} vs {rows[-2]['stage']}"
    log.info("recipe: %s: held-out pass@1 %.1f%% ± %.1f (%d problems x %d)%s", r["stage"],
             100 * r["pass@1"], 100 * r["stderr"], r["problems"], r["k"], change)


def _share_wandb(config: ConfigDict, stage: ConfigDict, root: str) -> None:
    """--config.wandb.* of the recipe applies to every stage: one W&B run per stage, grouped
    under the recipe's directory name unless a group is given."""
    if not (config.get("wandb") and config.wandb.project) or "wandb" not in stage:
        return
    for key, value in config.wandb.items():
        stage.wandb[key] = value
    stage.wandb.group = config.wandb.group or os.path.basename(root)


def _start_run(config: ConfigDict, root: str, first: ConfigDict) -> str:
    """A run directory holding the model stage 1 started from, for the table's first row: the
    step-0 checkpoint of a fresh start is not kept, so it is re-created deterministically."""
    if first.init.checkpoint:
        return first.init.checkpoint
    start = os.path.join(root, "start")
    if checkpointing.latest_step(start) is None:
        from phimr_jax.train.convert import run_convert, run_init
        cfg = ConfigDict({"workdir": start, "mesh": config.mesh, "step": 0, "seed": first.seed,
                          "sharding_rules": config.sharding_rules, "dtype": first.model.param_dtype,
                          "tokenizer_dir": os.path.join(root, config.order[0], "tokenizer")})
        if first.init.hf_dir:
            cfg.hf_dir = first.init.hf_dir
            run_convert(cfg)
        else:
            cfg.model_preset = first.model.preset
            run_init(cfg)
    return start
