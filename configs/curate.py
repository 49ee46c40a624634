"""Curate teacher rollouts into the stage-1, stage-2 and stage-3 datasets (verified by Math-Verify).

  python -m phimr_jax.main --config=configs/curate.py --config.rollouts='rollouts/*.jsonl' \
      --config.workdir=runs/curated
  (or --config.teacher.hf_dir=DIR / --config.teacher.checkpoint=RUN --config.problems=P.jsonl to
  sample the rollouts here; or the `demo` preset, which builds its input from the demo corpus)
Writes workdir/{midtrain,sft,dpo_pairs}.jsonl and report.json; a rerun resumes (see
phimr_jax/stages/curate.py).
"""

from ml_collections import ConfigDict

from phimr_jax.evaluation.inference import sampling_config
from phimr_jax.train.config_base import base_config


def get_config(arg=None):
    c = base_config("curate")
    c.rollouts = ""  # Rollout files: JSONL / Parquet paths, globs or directories, comma-separated.
    # Canonical field -> name in the files (rollouts, and `problems` in teacher mode). `rollout`
    # holds one rollout (a string) or several (a list of strings); difficulty/domain optional.
    c.fields = ConfigDict({"problem": "problem", "answer": "answer", "rollout": "rollout",
                           "difficulty": "difficulty", "domain": "domain"})
    c.skip_malformed = False  # True: skip and count malformed records; False: stop at file:line.
    c.chunk_size = 1024  # Input records per chunk (the unit of grading, resume and memory).
    c.grader_workers = 0  # Math-Verify worker processes (0 = min(8, CPUs)).
    c.grader_timeout_s = 5.0  # Hard per-rollout grading limit; a timeout is incorrect, counted.
    c.require_boxed = True  # No \boxed{} answer = incorrect without grading (False: let
    # Math-Verify's whole-text extraction try).
    c.bucket_mb = 256.0  # Pairing pass: chunk-result bytes per hash bucket held in memory at once.
    c.overwrite = False  # Discard chunks graded from other inputs/settings instead of refusing.
    c.stop_after_chunks = 0  # Debugging: stop after grading this many chunks (0 = run to the end).

    c.sft = ConfigDict()  # Stage-2 subset of the correct rollouts.
    c.sft.min_difficulty = -1.0  # Keep numeric difficulty >= this (-1 = off; none fails it).
    c.sft.domains = ""  # Comma-separated domains to keep ("" = all).
    c.sft.max_chars = 0  # Drop rollouts longer than this many characters (0 = off).
    c.sft.max_per_problem = 0  # Keep at most N correct rollouts per problem, seeded (0 = all).

    c.dpo = ConfigDict()  # Stage-3 preference pairs: chosen correct, rejected incorrect.
    c.dpo.policy = "one"  # one: one random pair per problem | all: every chosen x rejected pair.
    c.dpo.max_pairs_per_problem = 8  # policy all: a random subset of at most N (0 = no cap).
    c.dpo.min_difficulty = -1.0  # Pairs only for numeric difficulty >= this (-1 = off).
    c.dpo.rejected_needs_answer = True  # Rejected = a wrong boxed answer (False: also rollouts
    # without an answer, e.g. cut off at the length limit).

    c.problems = ""  # Teacher mode: problems with gold answers (fields.problem / fields.answer).
    c.teacher = sampling_config()  # Teacher mode: the model (hf_dir or checkpoint) and sampling.
    c.teacher.num_samples = 4  # Rollouts per problem.
    c.teacher.max_new_tokens = 4096  # Rollout budget (the paper's teacher wrote up to ~16K+).
    c.teacher.temperature = 0.8  # Some diversity, so problems get correct and incorrect rollouts.

    c.demo = False  # Build the input from the synthetic demo corpus (no download).
    c.demo_problems = 400  # Demo training problems, each with one correct rollout ...
    c.demo_wrong = 2  # ... and 1 to this many deliberately wrong rollouts.

    if arg == "demo":
        c.demo = True
        c.chunk_size = 64  # Several chunks even for the small demo input.
        c.grader_workers = 2
        c.sft.min_difficulty = 3  # The harder half of the synthetic corpus, as configs/sft.py:demo.
        c.dpo.policy = "all"
        c.dpo.max_pairs_per_problem = 2
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown preset {arg!r}: default | demo")
    return c
