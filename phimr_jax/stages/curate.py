"""Stage `curate`: teacher rollouts -> verified mid-training, SFT and DPO-pair datasets.

What (paper sections 3.1-3.3): a large teacher writes several rollouts per problem; rollouts whose
final answer Math-Verify finds equivalent to the gold answer feed stage-1 mid-training, a harder
subset of them stage-2 SFT, and correct vs incorrect rollouts of the same problem become stage-3
DPO preference pairs (the incorrect rollouts are reused there). This stage writes, in `workdir`:

  midtrain.jsonl   every correct rollout, input order: {problem, solution, answer, difficulty,
                   domain} (solution = the rollout text), the schema stages 1 and 2 read
  sft.jsonl        the correct rollouts passing `sft.*` (difficulty, domains, length, at most N
                   per problem), same schema
  dpo_pairs.jsonl  {problem, chosen, rejected, answer, difficulty, domain}: chosen correct,
                   rejected incorrect, same problem; `dpo.policy` "one" (one pair per problem) or
                   "all" (every chosen x rejected pair, capped at `dpo.max_pairs_per_problem`)
  report.json      counts (records, malformed, rollouts, correct / wrong / no answer, timeouts,
                   grader errors, problems, outputs) and accuracy per domain and per difficulty;
                   also printed as markdown tables

Input: JSONL / Parquet rollouts (`rollouts`, paths or globs) with configurable field names;
`fields.rollout` may hold one rollout (a string) or several (a list of strings), and a problem's
rollouts may be spread over any number of records anywhere in the files. Or `teacher.hf_dir` /
`teacher.checkpoint` + `problems`: rollouts sampled here (`teacher.num_samples` per problem) are
first written as rollout files, `workdir/teacher_rollouts/NNNNN.jsonl` (atomic renames: a rerun
samples only the missing files), then curated like any input. Or `demo`: a rollout file built
from the synthetic demo corpus (one correct and 1-2 deliberately wrong rollouts per problem, over
several records), so the whole stage runs without a download.

Verification: `RewardPool` (worker processes, hard per-item timeout, math mode). With
`require_boxed` (default) a rollout without a `\\boxed{}` answer is incorrect ("no_answer") and
never graded; otherwise Math-Verify's whole-text extraction gets a chance. A timeout or a grader
error scores incorrect and is counted (the pool reports them as counts, per chunk).

Streaming and resume: records are read lazily (JSONL line by line, Parquet batch by batch) and
processed in chunks of `chunk_size` input records (malformed ones included, so chunk boundaries
never depend on validation). Each chunk's verified rollouts go to `workdir/chunks/NNNNN.jsonl`
(one line per rollout, with its problem key = a hash of the problem text, and its status), then
`NNNNN.done` (its counts) is written last, both by atomic rename. A rerun skips every chunk with
a `.done`: its records are read past, not graded (JSONL lines are not even parsed).
`chunks/manifest.json` pins the input files (path, size, mtime), field names, chunk size and
`require_boxed`; a rerun against other input refuses (or `overwrite=True` starts over); the
grader settings are not pinned. Everything after grading (`sft.*`, `dpo.*`) is recomputed from
the chunk files on every run, so changing a filter or the pairing policy never regrades.
Teacher rollout files are likewise reused as they are (delete them to sample again).

Pairing without holding all rollouts: a final pass reads the chunk files in order, writes
midtrain.jsonl (input order), and appends each rollout line to one of K hash-bucket files
(`workdir/buckets/`, bucket = key mod K, K = total chunk bytes / `bucket_mb`; lines are
buffered up to min(64 MB, bucket_mb) and appended, so K files are never open at once). Memory
is one chunk while grading, then one parsed bucket (a few times `bucket_mb`): a 100 MB input,
chunk_size 256, bucket_mb 16 peaked at 330 MB RSS, ~220 MB of it the JAX-importing package.
Every rollout of a problem lands in the same bucket, wherever its records were. Each bucket is then loaded alone and grouped by problem key (first
appearance order), and sft.jsonl / dpo_pairs.jsonl are written problem by problem. Random
choices (sft.max_per_problem, dpo sampling) use `random.Random(f"{seed}:{what}:{key}")`: they
depend on the seed and the problem only, not on chunking, bucketing or earlier problems. Outputs
are written under temporary names and renamed at the end; buckets are rebuilt on every run.

Simplifications: single host (no multi-process sampling or grading); a malformed record with
`skip_malformed=False` stops the run when its chunk is reached (earlier chunks stay done), not
before anything is graded; the pool counts timeouts but does not say which rollout timed out, so
a timed-out rollout is an ordinary incorrect one (it may become a rejected sample); the
`sft.min_difficulty` / `dpo.min_difficulty` filters read a difficulty as the SFT pipeline does
(`difficulty_value`), and a record without a readable number fails them; a problem's gold
answer, difficulty and domain are taken per rollout record (a pair uses the chosen rollout's).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from typing import Callable, Optional

from ml_collections import ConfigDict

from phimr_jax.data.pipelines import difficulty_value
from phimr_jax.data.sources import DataError, expand_patterns, open_records
from phimr_jax.evaluation.rewards import RewardPool, extract_answer
from phimr_jax.stages.curate_io import (CHUNK_DIR, OUTPUTS, demo_rollouts, final_pass, manifest,
                                        parse, prepare_chunk_dir, problem_key, raw_records,
                                        read_json, write_atomic, write_json)

log = logging.getLogger(__name__)

TEACHER_DIR = "teacher_rollouts"
CANONICAL_FIELDS = {k: k for k in ("problem", "answer", "rollout", "difficulty", "domain")}
STATUSES = ("correct", "wrong", "no_answer")  # wrong: a boxed answer that is not equivalent
MAX_EXAMPLES = 5  # malformed-record messages kept in the report


# ---------------------------------------------------------------------------------- grading

def _new_stats() -> dict:
    return {"records": 0, "malformed": 0, "malformed_examples": [], "rollouts": 0, "graded": 0,
            "timeouts": 0, "grader_errors": 0, "seconds": 0.0, "by_domain": {},
            "by_difficulty": {}, **{s: 0 for s in STATUSES}}


def _level_name(difficulty) -> str:
    if difficulty is None:
        return "none"
    if isinstance(difficulty, float) and difficulty.is_integer():
        difficulty = int(difficulty)  # 3.0 from Parquet and 3 from JSONL are one level
    return str(difficulty)


def _grade_chunk(raws: list, fields: dict, config: ConfigDict, pool: RewardPool
                 ) -> tuple[list[dict], dict]:
    """Parse and verify one chunk of raw records -> (rows, one per rollout, and counts)."""
    stats, rows = _new_stats(), []
    for path, number, raw in raws:
        try:
            rec = parse(raw, fields)
        except ValueError as e:
            if not config.skip_malformed:
                raise DataError(f"{path}:{number}: {e}") from None
            stats["malformed"] += 1
            if len(stats["malformed_examples"]) < MAX_EXAMPLES:
                stats["malformed_examples"].append(f"{path}:{number}: {e}")
            continue
        stats["records"] += 1
        key = problem_key(rec["problem"])
        for text in rec.pop("rollouts"):
            rows.append({"key": key, **rec, "rollout": text, "status": "no_answer"})
    graded = [i for i, r in enumerate(rows)
              if not config.require_boxed or extract_answer(r["rollout"]) is not None]
    start, timeouts, errors = time.perf_counter(), pool.num_timeouts, pool.num_errors
    if graded:
        ok = pool.grade([rows[i]["rollout"] for i in graded], [rows[i]["answer"] for i in graded],
                        "math", timeout_s=config.grader_timeout_s)
        for i, good in zip(graded, ok):
            if good:
                rows[i]["status"] = "correct"
            elif extract_answer(rows[i]["rollout"]) is not None:
                rows[i]["status"] = "wrong"
    stats.update(rollouts=len(rows), graded=len(graded), seconds=time.perf_counter() - start,
                 timeouts=pool.num_timeouts - timeouts, grader_errors=pool.num_errors - errors)
    for r in rows:
        stats[r["status"]] += 1
        for table, name in (("by_domain", r["domain"] or "none"),
                            ("by_difficulty", _level_name(r["difficulty"]))):
            counts = stats[table].setdefault(name, [0, 0])
            counts[0] += 1
            counts[1] += r["status"] == "correct"
    return rows, stats


def _grade_all(files: list[str], fields: dict, config: ConfigDict, chunk_dir: str,
               get_pool: Callable[[], RewardPool]) -> Optional[tuple[int, dict]]:
    """Grade every chunk not yet done. Returns (number of chunks, run counts), or None when
    stopped early by `stop_after_chunks`."""
    run = {"chunks": 0, "chunks_reused": 0, "rollouts_graded_this_run": 0,
           "grading_seconds_this_run": 0.0}
    stream = raw_records(files, fields)
    for index in itertools.count():
        raws = list(itertools.islice(stream, config.chunk_size))
        if not raws:
            return index, run
        run["chunks"] += 1
        stem = os.path.join(chunk_dir, f"{index:05d}")
        if os.path.exists(stem + ".done"):
            run["chunks_reused"] += 1
            continue
        if config.stop_after_chunks and run["chunks"] - run["chunks_reused"] > \
                config.stop_after_chunks:
            log.info("stopping after %d graded chunks (stop_after_chunks); rerun to resume",
                     config.stop_after_chunks)
            return None
        rows, stats = _grade_chunk(raws, fields, config, get_pool())
        write_atomic(stem + ".jsonl", lambda f: f.writelines(
            json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_json(stem + ".done", stats)  # the completion marker, written last
        run["rollouts_graded_this_run"] += stats["graded"]
        run["grading_seconds_this_run"] += stats["seconds"]
        log.info("chunk %d: %d records, %d rollouts, %d correct, %d timeouts (%.1f s)", index,
                 stats["records"], stats["rollouts"], stats["correct"], stats["timeouts"],
                 stats["seconds"])


# ------------------------------------------------------------------------------------ report

def _accuracy(table: dict) -> dict:
    def order(name):
        try:
            return (0, difficulty_value(name) if name != "none" else math.inf, name)
        except DataError:
            return (1, 0.0, name)
    return {name: {"rollouts": n, "correct": c, "accuracy": round(c / n, 4)}
            for name, (n, c) in sorted(table.items(), key=lambda kv: order(kv[0]))}


def _report(chunk_dir: str, num_chunks: int, counts: dict, run: dict, files: list[str],
            extra: dict) -> dict:
    total = _new_stats()
    for i in range(num_chunks):
        stats = read_json(os.path.join(chunk_dir, f"{i:05d}.done"))
        for k, v in stats.items():
            if k in ("by_domain", "by_difficulty"):
                for name, (n, c) in v.items():
                    acc = total[k].setdefault(name, [0, 0])
                    acc[0] += n
                    acc[1] += c
            elif k == "malformed_examples":
                total[k] = (total[k] + v)[:MAX_EXAMPLES]
            elif k != "seconds":
                total[k] += v
    seconds = run["grading_seconds_this_run"]
    run = {**run, "grading_seconds_this_run": round(seconds, 3), "buckets": counts["buckets"],
           "rollouts_per_s": round(run["rollouts_graded_this_run"] / seconds, 1) if seconds
           else None}
    return {
        "inputs": {"files": files, **extra},
        "records": {"seen": total["records"] + total["malformed"], "valid": total["records"],
                    "malformed_skipped": total["malformed"],
                    "malformed_examples": total["malformed_examples"]},
        "rollouts": {"seen": total["rollouts"], "correct": total["correct"],
                     "incorrect": total["rollouts"] - total["correct"], "wrong": total["wrong"],
                     "no_answer": total["no_answer"], "graded": total["graded"],
                     "timeouts": total["timeouts"], "grader_errors": total["grader_errors"]},
        "problems": {"seen": counts["problems"], "with_correct": counts["problems_with_correct"],
                     "with_both": counts["problems_with_both"]},
        "outputs": {k: counts[k] for k in ("midtrain", "sft", "sft_problems", "dpo_pairs",
                                           "dpo_problems")},
        "accuracy_by_domain": _accuracy(total["by_domain"]),
        "accuracy_by_difficulty": _accuracy(total["by_difficulty"]),
        "run": run,
    }


def markdown(report: dict) -> str:
    """The report as markdown tables (counts, then accuracy per domain and per difficulty)."""
    lines = ["| count | value |", "|---|---|"]
    for section in ("records", "rollouts", "problems", "outputs"):
        lines += [f"| {section}.{k} | {v} |" for k, v in report[section].items()
                  if not isinstance(v, list)]
    for table in ("accuracy_by_domain", "accuracy_by_difficulty"):
        name = table.rsplit("_", 1)[1]
        lines += ["", f"| {name} | rollouts | correct | accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['rollouts']} | {v['correct']} | {v['accuracy']:.1%} |"
                  for k, v in report[table].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ inputs

def _teacher_rollouts(config: ConfigDict) -> tuple[str, dict]:
    """Sample teacher.num_samples rollouts per problem of `problems` into
    workdir/teacher_rollouts/NNNNN.jsonl (chunk_size problems per file; existing files are
    kept, so an interrupted run samples only what is missing). Returns (glob, report info)."""
    import jax

    from phimr_jax.evaluation.inference import load_model_and_tokenizer, sample_questions
    from phimr_jax.model.sharding import axis_rules
    from phimr_jax.train.metrics import Countdown

    if jax.process_count() > 1:
        raise ValueError("teacher sampling in the curate stage runs on one host")
    if not config.problems:
        raise ValueError("teacher sampling needs --config.problems=FILE (problems with answers)")
    f = config.fields
    src = open_records(config.problems, fields={"problem": f.problem, "answer": f.answer,
                                                "difficulty": f.difficulty, "domain": f.domain},
                       required=("problem", "answer"), skip_malformed=config.skip_malformed)
    out_dir = os.path.join(config.workdir, TEACHER_DIR)
    os.makedirs(out_dir, exist_ok=True)
    size = config.chunk_size
    todo = [s for s in range(0, len(src), size)
            if not os.path.exists(os.path.join(out_dir, f"{s // size:05d}.jsonl"))]
    if todo:
        sampling = ConfigDict(dict(config.teacher))
        sampling.update(mesh=config.mesh, sharding_rules=config.sharding_rules, seed=config.seed)
        model, tokenizer, mesh, rules = load_model_and_tokenizer(sampling)
        k = sampling.num_samples
        progress = Countdown("teacher: sampled problems",
                             sum(min(size, len(src) - start) for start in todo))
        done = 0
        for start in todo:
            recs = [src[i] for i in range(start, min(start + size, len(src)))]
            with jax.set_mesh(mesh), axis_rules(rules):
                res = sample_questions(model, tokenizer, [r["problem"] for r in recs],
                                       sampling, seed=config.seed + start)
            texts = [tokenizer.decode(toks[:-1] if reason == "stop" else toks)  # prompt-major
                     for toks, reason in zip(res.tokens, res.finish_reasons)]
            records = [{**r, "rollout": texts[j * k:(j + 1) * k]} for j, r in enumerate(recs)]
            write_atomic(os.path.join(out_dir, f"{start // size:05d}.jsonl"),
                         lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                  for r in records))
            done += len(recs)
            progress.update(done)
    return (os.path.join(out_dir, "*.jsonl"),
            {"problems_file": config.problems, "problems_malformed": src.num_malformed})


def _check(config: ConfigDict) -> None:
    if not config.workdir:
        raise ValueError("missing required option --config.workdir=DIR")
    if config.chunk_size < 1 or config.bucket_mb <= 0 or config.grader_timeout_s <= 0:
        raise ValueError("chunk_size, bucket_mb and grader_timeout_s must be > 0")
    if config.dpo.policy not in ("one", "all"):
        raise ValueError(f"dpo.policy must be 'one' or 'all', got {config.dpo.policy!r}")
    teacher = bool(config.teacher.hf_dir or config.teacher.checkpoint)
    if sum([bool(config.rollouts), teacher, bool(config.demo)]) != 1:
        raise ValueError("give exactly one input: --config.rollouts=GLOB, a teacher "
                         "(--config.teacher.hf_dir / .checkpoint + --config.problems), or demo")


# --------------------------------------------------------------------------------- the stage

def curate(config: ConfigDict, pool: Optional[RewardPool] = None) -> Optional[dict]:
    """Run the stage (see module doc); returns the report, or None if stopped by
    stop_after_chunks. pool: grade with this pool (default: a new one, closed at the end)."""
    _check(config)
    os.makedirs(config.workdir, exist_ok=True)
    extra, fields = {}, dict(config.fields)
    if config.demo:
        pattern, fields = demo_rollouts(config), dict(CANONICAL_FIELDS)
    elif config.rollouts:
        pattern = config.rollouts
    else:
        (pattern, extra), fields = _teacher_rollouts(config), dict(CANONICAL_FIELDS)
    files = expand_patterns(pattern)
    chunk_dir = os.path.join(config.workdir, CHUNK_DIR)
    prepare_chunk_dir(chunk_dir, manifest(files, fields, config), config.overwrite)

    owned: list[RewardPool] = []

    def get_pool() -> RewardPool:  # started only if some chunk needs grading
        if pool is not None:
            return pool
        if not owned:
            owned.append(RewardPool(num_workers=config.grader_workers or None,
                                    timeout_s=config.grader_timeout_s))
        return owned[0]

    try:
        graded = _grade_all(files, fields, config, chunk_dir, get_pool)
    finally:
        for p in owned:
            p.close()
    if graded is None:
        return None
    num_chunks, run = graded
    counts = final_pass(config.workdir, num_chunks, config)
    report = _report(chunk_dir, num_chunks, counts, run, files, extra)
    write_json(os.path.join(config.workdir, "report.json"), report)
    return report


def run(config: ConfigDict) -> Optional[dict]:
    report = curate(config)
    if report is not None:
        print(markdown(report))
        log.info("wrote %s to %s", ", ".join(OUTPUTS.values()), config.workdir)
    return report
