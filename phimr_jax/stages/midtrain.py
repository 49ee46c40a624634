"""Stage 1, distillation mid-training (paper section 3.1).

Objective: next-token cross-entropy on the assistant part (the teacher's chain of thought and
the final <|end|>) of verified-correct teacher rollouts, prompts in the Phi-4-mini-reasoning chat
format and not trained. Rows are PACKED: examples are first-fit packed into rows of
`data.seq_len` tokens with segment ids (attention never crosses examples) and positions that
restart per example; the loss is the token-weighted mean over all trained tokens of the batch.
Paper: 16K tokens, batch 128, LR 1e-5, 5 epochs, 10% warmup (configs/midtrain.py:phi4_mini).

Simplifications: examples longer than seq_len are dropped and counted, not split; with
total_steps=-1 the number of steps assumes fully packed rows (tokens / seq_len per epoch).
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from phimr_jax.data.pipelines import midtrain_dataset
from phimr_jax.stages import distill
from phimr_jax.train.trainer import train


def make_data(config: ConfigDict, tokenizer):
    dataset, stats = midtrain_dataset(distill.open_train_source(config), tokenizer,
                                      seq_len=config.data.seq_len, **distill.shard_args(config))
    out = stats.as_dict()
    out["rows_per_epoch"] = -(-stats.num_tokens // config.data.seq_len) * jax.process_count()
    return dataset, out


def run(config: ConfigDict) -> dict:
    return train(config, distill.make_stage("midtrain", config, make_data))
