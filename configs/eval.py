"""Evaluate a model with the paper's protocol on a JSONL benchmark (MATH-500, AIME, GPQA).

  python -m phimr_jax.main --config=configs/eval.py:math500 --config.hf_dir=DIR \
      --config.dataset=math500.jsonl --config.workdir=runs/eval
Presets set the field names and samples per problem: math500 (8 samples), aime (64 samples),
gpqa (8 samples, multiple choice), demo (the demo corpus' held-out file, greedy-sized budget).
"""

from phimr_jax.evaluation.inference import sampling_config
from phimr_jax.train.config_base import base_config


def get_config(arg="math500"):
    c = base_config("eval")
    c.update(sampling_config())
    c.dataset = ""  # JSONL file(s) of problems with gold answers.
    c.name = ""  # Benchmark name for workdir/eval/<name>.json ("" = the file's base name).
    c.format = "math"  # math (problem + answer fields) | gpqa (Question / Correct Answer ...).
    c.problem_field = "problem"  # math format: field with the problem text.
    c.answer_field = "answer"  # math format: field with the gold answer.
    c.difficulty_field = "level"  # math format: optional field for a per-difficulty breakdown
    # of pass@1 in the summary (MATH-500: "level"; the demo corpus: "difficulty"; "" = none).
    # Prompt suffix ("" = the paper's "Please reason step by step, ..."; "none" = no suffix).
    c.suffix = ""
    c.limit = 0  # Evaluate only the first N problems (0 = all).
    c.max_new_tokens = 32768  # Paper: up to 32,768 generated tokens.
    c.num_samples = 8  # k samples per problem for pass@1 (paper: 64 for AIME, 8 otherwise).
    c.grader_workers = 8  # Math-Verify worker processes.
    c.grader_timeout_s = 10.0  # Hard per-sample grading timeout (a hung grader is killed).
    c.save_completions = True  # Keep every completion's text in the per-problem results.
    preset = arg or "math500"
    if preset == "aime":
        c.num_samples = 64
    elif preset == "gpqa":
        c.format = "gpqa"
    elif preset == "demo":
        c.difficulty_field = "difficulty"
        # The demo corpus' training prompts carry no suffix: evaluate the demo model on the
        # prompts it was trained on (a 4-layer model does not generalise to an unseen suffix).
        c.suffix = "none"
        c.max_new_tokens = 192  # The longest demo solution (level 6) is 168 tokens.
        c.num_samples = 4
        c.dtype = "float32"
        c.grader_workers = 2
    elif preset != "math500":
        raise ValueError(f"unknown preset {preset!r}: math500 | aime | gpqa | demo")
    return c
