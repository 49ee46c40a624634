"""Files of the `curate` stage (`phimr_jax.stages.curate`): input records, chunk files, pairing.

Everything that reads or writes the stage's files, apart from grading, teacher sampling and
the report, which stay in `curate`:

  - `problem_key` (a problem's grouping key) and atomic file / JSON writes;
  - the demo input (a rollout file built from the synthetic demo corpus), the lazy input record
    stream (JSONL lines, Parquet batches) and the parsing of one record into the canonical
    form, with its malformed-record reasons;
  - the chunk directory's manifest (what the chunk files depend on) and its reuse check;
  - the final pass: chunk files -> midtrain.jsonl (input order) and hash-bucket files, then
    per problem the SFT filter and the DPO pairing (sft.jsonl, dpo_pairs.jsonl).

Kept apart from `curate` so the stage's run logic reads on its own; see `curate`'s module doc for
the on-disk layout, resume rules and the memory bound of the bucketed pairing pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import random
import shutil
from typing import Callable, Iterator, Optional

from ml_collections import ConfigDict

from phimr_jax.data import demo_corpus
from phimr_jax.data.pipelines import difficulty_value
from phimr_jax.data.sources import PARQUET_EXTENSIONS, DataError

CHUNK_DIR, BUCKET_DIR, DEMO_DIR = "chunks", "buckets", "demo_input"
OUTPUTS = {"midtrain": "midtrain.jsonl", "sft": "sft.jsonl", "dpo_pairs": "dpo_pairs.jsonl"}
PARQUET_BATCH = 1024  # rows decoded at a time
FLUSH_BYTES = 64 << 20  # bucket lines buffered before they are appended to the bucket files


def problem_key(problem: str) -> str:
    """The grouping key of a problem: 64 bits of SHA-1 of its exact text."""
    return hashlib.sha1(problem.encode("utf-8")).hexdigest()[:16]


def write_atomic(path: str, write: Callable) -> None:
    """write(f) into path.tmp, fsync, rename: readers see the whole file or none of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=1))


# ------------------------------------------------------------------------------------ input

def demo_rollouts(config: ConfigDict) -> str:
    """workdir/demo_input/rollouts.jsonl: per demo problem its correct solution and 1 to
    `demo_wrong` deliberately wrong ones, over two records placed far apart (the first records
    in problem order, the second ones shuffled after them), either field form. Built once: a
    rebuilt file would change the chunk manifest."""
    out_dir = os.path.join(config.workdir, DEMO_DIR)
    path = os.path.join(out_dir, "rollouts.jsonl")
    if os.path.exists(path):
        return path
    paths = demo_corpus.generate(out_dir, n_train=config.demo_problems, n_heldout=0,
                                 seed=config.seed)
    rng = random.Random(config.seed)
    first, second = [], []
    with open(paths["train"], encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            base = {k: rec[k] for k in ("problem", "answer", "difficulty", "domain")}
            wrong = [demo_corpus.wrong_solution(rec, rng)["solution"]
                     for _ in range(rng.randint(1, config.demo_wrong))]
            if rng.random() < 0.5:  # correct alone (a string), the wrong ones later (a list)
                first.append({**base, "rollout": rec["solution"]})
                second.append({**base, "rollout": wrong})
            else:  # a list with a wrong one first, any other wrong one later
                first.append({**base, "rollout": [wrong[0], rec["solution"]]})
                second += [{**base, "rollout": w} for w in wrong[1:]]
    rng.shuffle(second)
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in first + second))
    return path


def raw_records(files: list[str], fields: dict) -> Iterator[tuple[str, int, object]]:
    """(path, 1-based line or row, raw) for every input record in order. raw is a JSONL line's
    bytes (parsed only if its chunk is graded) or a Parquet row as a dict. Blank lines are not
    records."""
    for path in files:
        if path.endswith(PARQUET_EXTENSIONS):
            yield from _parquet_rows(path, fields)
            continue
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield path, lineno, line


def _parquet_rows(path: str, fields: dict) -> Iterator[tuple[str, int, dict]]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    missing = [f"{fields[c]!r} ({c})" for c in ("problem", "answer", "rollout")
               if fields[c] not in names]
    if missing:  # a configuration error, not a malformed record: always fatal
        raise DataError(f"{path}: required columns {', '.join(missing)} not in the schema "
                        f"{sorted(names)}")
    columns = [n for n in dict.fromkeys(fields.values()) if n in names]
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield path, row, obj


def parse(raw, fields: dict) -> dict:
    """The canonical record {problem, answer, rollouts, difficulty, domain}; ValueError(reason)
    if malformed. Answers may be numbers (datasets often store them so); rollouts must be
    non-empty strings."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"record is a {type(raw).__name__}, not an object")
    rec = {canon: raw.get(name) for canon, name in fields.items()}
    label = {c: f"field {n!r}" + (f" ({c})" if c != n else "") for c, n in fields.items()}
    if isinstance(rec["answer"], numbers.Number) and not isinstance(rec["answer"], bool):
        rec["answer"] = str(rec["answer"])
    for canon in ("problem", "answer"):
        if not isinstance(rec[canon], str) or not rec[canon].strip():
            raise ValueError(f"{label[canon]} must be a non-empty string, got {rec[canon]!r:.40}")
    rollouts = rec.pop("rollout")
    rollouts = [rollouts] if isinstance(rollouts, str) else rollouts
    if (not isinstance(rollouts, list) or not rollouts
            or not all(isinstance(r, str) and r.strip() for r in rollouts)):
        raise ValueError(f"{label['rollout']} must be a non-empty string or a non-empty list of "
                         f"them, got {type(rollouts).__name__}")
    rec["rollouts"] = rollouts
    if rec["difficulty"] is not None and (isinstance(rec["difficulty"], bool) or not isinstance(
            rec["difficulty"], (str, int, float))):
        raise ValueError(f"{label['difficulty']} must be str/int/float")
    if rec["domain"] is not None and not isinstance(rec["domain"], str):
        raise ValueError(f"{label['domain']} must be a string")
    return rec


# ------------------------------------------------------------------------------ chunk files

def manifest(files: list[str], fields: dict, config: ConfigDict) -> dict:
    """What the chunk files depend on: a rerun with another manifest must not reuse them."""
    return {"files": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
                      for p in files],
            "fields": dict(fields), "chunk_size": config.chunk_size,
            "require_boxed": config.require_boxed}


def prepare_chunk_dir(chunk_dir: str, manifest: dict, overwrite: bool) -> None:
    path = os.path.join(chunk_dir, "manifest.json")
    if os.path.isdir(chunk_dir) and os.listdir(chunk_dir):
        same = os.path.exists(path) and read_json(path) == manifest
        if not same and not overwrite:
            raise ValueError(f"{chunk_dir} holds chunks of other input files or settings (see "
                             f"its manifest.json): use a new workdir or --config.overwrite=True")
        if not same:
            shutil.rmtree(chunk_dir)
    os.makedirs(chunk_dir, exist_ok=True)
    if not os.path.exists(path):
        write_json(path, manifest)


# ---------------------------------------------------------------------- final pass: pairing

def _passes_difficulty(row: dict, min_difficulty: float) -> bool:
    if min_difficulty < 0:
        return True
    try:
        level = difficulty_value(row["difficulty"])
    except DataError:  # a difficulty with no number in it
        return False
    return level is not None and level >= min_difficulty


def _sft_keep(row: dict, sft: ConfigDict, domains: Optional[frozenset]) -> bool:
    return (_passes_difficulty(row, sft.min_difficulty)
            and (domains is None or row["domain"] in domains)
            and (not sft.max_chars or len(row["rollout"]) <= sft.max_chars))


def _solution(row: dict) -> dict:
    return {"problem": row["problem"], "solution": row["rollout"], "answer": row["answer"],
            "difficulty": row["difficulty"], "domain": row["domain"]}


def _curate_problem(key: str, rows: list[dict], config: ConfigDict, domains, out: dict,
                    counts: dict) -> None:
    """Write one problem's SFT records and DPO pairs (rows: its rollouts in input order)."""
    correct = [r for r in rows if r["status"] == "correct"]
    incorrect = [r for r in rows if r["status"] != "correct"]
    counts["problems"] += 1
    counts["problems_with_correct"] += bool(correct)
    counts["problems_with_both"] += bool(correct and incorrect)

    keep = [r for r in correct if _sft_keep(r, config.sft, domains)]
    cap = config.sft.max_per_problem
    if cap and len(keep) > cap:
        rng = random.Random(f"{config.seed}:sft:{key}")
        keep = [keep[i] for i in sorted(rng.sample(range(len(keep)), cap))]
    for r in keep:
        out["sft"].write(json.dumps(_solution(r), ensure_ascii=False) + "\n")
    counts["sft"] += len(keep)
    counts["sft_problems"] += bool(keep)

    dpo = config.dpo
    chosen = [r for r in correct if _passes_difficulty(r, dpo.min_difficulty)]
    rejected = [r for r in incorrect if r["status"] == "wrong" or not dpo.rejected_needs_answer]
    n = len(chosen) * len(rejected)
    if not n:
        return
    rng = random.Random(f"{config.seed}:dpo:{key}")
    if dpo.policy == "one":
        picks = [rng.randrange(n)]
    elif dpo.max_pairs_per_problem and n > dpo.max_pairs_per_problem:
        picks = sorted(rng.sample(range(n), dpo.max_pairs_per_problem))
    else:
        picks = range(n)
    for p in picks:
        c, r = chosen[p // len(rejected)], rejected[p % len(rejected)]
        out["dpo_pairs"].write(json.dumps(
            {"problem": c["problem"], "chosen": c["rollout"], "rejected": r["rollout"],
             "answer": c["answer"], "difficulty": c["difficulty"], "domain": c["domain"]},
            ensure_ascii=False) + "\n")
    counts["dpo_pairs"] += len(picks)
    counts["dpo_problems"] += 1


def final_pass(workdir: str, num_chunks: int, config: ConfigDict) -> dict:
    """Chunk files -> midtrain.jsonl (input order) + hash buckets -> sft / dpo outputs."""
    chunk_files = [os.path.join(workdir, CHUNK_DIR, f"{i:05d}.jsonl") for i in range(num_chunks)]
    total = sum(os.path.getsize(p) for p in chunk_files)
    bucket_bytes = config.bucket_mb * (1 << 20)
    num_buckets = max(1, math.ceil(total / bucket_bytes))
    flush_at = min(FLUSH_BYTES, bucket_bytes)  # the buffer costs no more than a bucket
    bucket_dir = os.path.join(workdir, BUCKET_DIR)
    shutil.rmtree(bucket_dir, ignore_errors=True)  # a pure function of the chunks: rebuilt
    os.makedirs(bucket_dir)
    bucket_files = [os.path.join(bucket_dir, f"{b:05d}.jsonl") for b in range(num_buckets)]
    counts = dict.fromkeys(("midtrain", "sft", "dpo_pairs", "problems", "problems_with_correct",
                            "problems_with_both", "sft_problems", "dpo_problems"), 0)
    counts["buckets"] = num_buckets
    paths = {name: os.path.join(workdir, f) for name, f in OUTPUTS.items()}
    out = {name: open(p + ".tmp", "w", encoding="utf-8") for name, p in paths.items()}
    try:
        buffers, buffered = [[] for _ in range(num_buckets)], 0
        for path in chunk_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if row["status"] == "correct":
                        out["midtrain"].write(json.dumps(_solution(row), ensure_ascii=False)
                                              + "\n")
                        counts["midtrain"] += 1
                    buffers[int(row["key"], 16) % num_buckets].append(line)
                    buffered += len(line)
                    if buffered > flush_at:  # append to each bucket: never K open files
                        buffered = _flush(buffers, bucket_files)
        _flush(buffers, bucket_files)
        domains = frozenset(d.strip() for d in config.sft.domains.split(",") if d.strip()) or None
        for path in bucket_files:
            groups: dict[str, list] = {}  # insertion order: first appearance in the input
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        row = json.loads(line)
                        groups.setdefault(row["key"], []).append(row)
            for key, rows in groups.items():
                _curate_problem(key, rows, config, domains, out, counts)
    finally:
        for f in out.values():
            f.close()
    for name, p in paths.items():
        os.replace(p + ".tmp", p)
    shutil.rmtree(bucket_dir)
    return counts


def _flush(buffers: list[list], bucket_files: list[str]) -> int:
    for lines, path in zip(buffers, bucket_files):
        if lines:
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(lines)
            lines.clear()
    return 0
