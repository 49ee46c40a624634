"""Stage 2, distillation supervised fine-tuning (paper section 3.2).

Objective: the same next-token cross-entropy on the assistant part, on a harder subset
(`data.min_difficulty`, `data.domains`; its hardest examples repeated within each epoch with
`data.oversample_min_difficulty` / `data.oversample_repeats`), but NOT packed: one example
per row, right-padded to `data.seq_len`, so every row ends where its answer ends and the model
learns when to stop (the final <|end|> carries loss; prompt tokens and padding do not).
Usually initialised from the stage-1 run (`init.checkpoint`). Paper: 20K tokens, batch 128,
LR 1e-5, 5 epochs, 10% warmup.

Padding-free (`data.padding_free`): the step's examples share rows instead, each whole, with
its own segment id and positions from 0, so it attends only to itself and its loss is that of
its padded row; the same examples per step and the same token-weighted loss, on about 57% of
the rows on the demo corpus (the row count is rounded up to a multiple of the batch's
device x microbatch split).

Simplifications: too-long examples are dropped and counted, not truncated; without
`padding_free`, rows are padded to one fixed length (no length bucketing), which wastes compute
on short examples.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from phimr_jax.data.pipelines import sft_dataset
from phimr_jax.model.sharding import batch_shards
from phimr_jax.stages import distill
from phimr_jax.train.config_base import mesh_and_rules
from phimr_jax.train.trainer import train


def make_data(config: ConfigDict, tokenizer):
    d = config.data
    dataset, stats = sft_dataset(
        distill.open_train_source(config), tokenizer, seq_len=d.seq_len,
        min_difficulty=d.min_difficulty if d.min_difficulty >= 0 else None,
        domains=[x.strip() for x in d.domains.split(",") if x.strip()] or None,
        oversample=(d.oversample_min_difficulty, d.oversample_repeats)
        if d.oversample_repeats != 1 else None,
        padding_free=bool(d.get("padding_free", False)), row_multiple=_row_multiple(config),
        **distill.shard_args(config))
    out = stats.as_dict()
    out["rows_per_epoch"] = stats.num_kept * jax.process_count()
    return dataset, out


def _row_multiple(config: ConfigDict) -> int:
    """Padding-free rows split evenly over the devices the batch is sharded on and over the
    gradient-accumulation microbatches, in steps of at least 4 rows: each row count is a new
    shape to compile (~5 s for the demo step), and on the demo corpus 16 examples then take 8
    or 12 rows (mean 9.1; in steps of 1, 6 to 12)."""
    if not config.data.get("padding_free", False):
        return 1
    if jax.process_count() > 1:
        raise ValueError("data.padding_free packs each host's examples into its own number of "
                         "rows; a multi-host run needs one shape everywhere: leave it off")
    mesh, rules = mesh_and_rules(config)
    split = int(config.optim.grad_accum_steps) * batch_shards(mesh, rules, mesh.size * 1024)
    return split * -(-4 // split)


def run(config: ConfigDict) -> dict:
    return train(config, distill.make_stage("sft", config, make_data))
