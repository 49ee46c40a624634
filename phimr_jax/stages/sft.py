"""Stage 2, distillation supervised fine-tuning (paper section 3.2).

Objective: the same next-token cross-entropy on the assistant part, on a harder subset
(`data.min_difficulty`, `data.domains`; its hardest examples repeated within each epoch with
`data.oversample_min_difficulty` / `data.oversample_repeats`), but NOT packed: one example
per row, right-padded to `data.seq_len`, so every row ends where its answer ends and the model
learns when to stop (the final <|end|> carries loss; prompt tokens and padding do not).
Usually initialised from the stage-1 run (`init.checkpoint`). Paper: 20K tokens, batch 128,
LR 1e-5, 5 epochs, 10% warmup.

Simplifications: too-long examples are dropped and counted, not truncated; rows are padded to
one fixed length (no length bucketing), which wastes compute on short examples.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from phimr_jax.data.pipelines import sft_dataset
from phimr_jax.stages import distill
from phimr_jax.train.trainer import train


def make_data(config: ConfigDict, tokenizer):
    d = config.data
    dataset, stats = sft_dataset(
        distill.open_train_source(config), tokenizer, seq_len=d.seq_len,
        min_difficulty=d.min_difficulty if d.min_difficulty >= 0 else None,
        domains=[x.strip() for x in d.domains.split(",") if x.strip()] or None,
        oversample=(d.oversample_min_difficulty, d.oversample_repeats)
        if d.oversample_repeats != 1 else None,
        **distill.shard_args(config))
    out = stats.as_dict()
    out["rows_per_epoch"] = stats.num_kept * jax.process_count()
    return dataset, out


def run(config: ConfigDict) -> dict:
    return train(config, distill.make_stage("sft", config, make_data))
