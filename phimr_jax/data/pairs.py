"""Preference pairs for DPO: (problem, chosen rollout, rejected rollout) -> padded row pairs.

A pair becomes two rows in the chat format, each `prompt_ids(problem) + completion_ids(rollout)`
right-padded to seq_len with the loss mask on the completion (its tokens and final <|end|>):
rows 2i (chosen) and 2i+1 (rejected) of a batch belong to pair i, and the batch carries each
row's reference log-probability (`ref_logp`, [2 * pairs]) looked up by the pair's index.

A record with a `prefix` is a step pair (Step-DPO, Lai et al. 2024): the solution's shared
first steps, then one chosen and one rejected next step. Both rows are
`prompt_ids(problem) + ids(prefix + step)` with the loss mask on the step's tokens only (the
prefix is context, identical on both sides) and no <|end|> (the solution goes on). Whole
rollouts score every completion token, so the consistent steps that follow a rejected
rollout's slip are pushed down with it; a step pair scores the slip alone.

Pairs with either side longer than seq_len are dropped and counted, never truncated.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import grain
import numpy as np

from phimr_jax.data.pipelines import PadRow, example_arrays, masked_arrays
from phimr_jax.data.tokenizers import ChatTokenizer


@dataclasses.dataclass(frozen=True)
class PairStats:
    num_pairs: int  # pairs in this shard
    num_kept: int  # pairs whose chosen and rejected rows both fit in seq_len
    num_too_long: int  # dropped: one side longer than seq_len
    num_malformed: int  # records the source skipped as malformed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def pair_rows(tokenizer: ChatTokenizer, record: dict, seq_len: int) -> Optional[dict]:
    """{key: [2, seq_len]} rows (chosen, rejected) of one pair, or None if a side is too long."""
    pad = PadRow(seq_len, tokenizer.pad_id)
    rows = []
    for side in ("chosen", "rejected"):
        if record.get("prefix"):
            ex = step_arrays(tokenizer, record["problem"], record["prefix"], record[side])
        else:
            ex = example_arrays(tokenizer, {"problem": record["problem"],
                                            "solution": record[side]})
        if len(ex["inputs"]) > seq_len:
            return None
        rows.append(pad(ex))
    return {k: np.stack([rows[0][k], rows[1][k]]) for k in rows[0]}


def step_arrays(tokenizer: ChatTokenizer, problem: str, prefix: str, step: str) -> dict:
    """Example arrays of a step pair's side: prefix + step after the prompt, the loss mask on
    the step's tokens (those past the prefix's own tokenisation), no <|end|>."""
    context = tokenizer.encode(prefix)
    ids = tokenizer.encode(prefix + step)
    if ids[:len(context)] != context or len(ids) == len(context):
        raise ValueError(f"step {step!r} does not extend the tokens of prefix {prefix!r} (cut "
                         "the prefix where the tokeniser starts a new token, e.g. before a "
                         "space)")
    prompt = tokenizer.prompt_ids(problem)
    return masked_arrays(prompt + ids, len(prompt) + len(context))


def kept_pairs(source, tokenizer: ChatTokenizer, seq_len: int, shard_index: int = 0,
               shard_count: int = 1, limit: int = 0) -> tuple[np.ndarray, PairStats]:
    """Indices of this shard's pairs that fit (one tokenisation pass), with counts; `limit` > 0
    looks at the first `limit` pairs of the source only."""
    end = len(source) if limit <= 0 else min(int(limit), len(source))
    indices = np.arange(shard_index, end, shard_count, dtype=np.int64)
    keep = np.array([pair_rows(tokenizer, source[int(i)], seq_len) is not None for i in indices],
                    bool)
    stats = PairStats(num_pairs=len(indices), num_kept=int(keep.sum()),
                      num_too_long=int((~keep).sum()),
                      num_malformed=getattr(source, "num_malformed", 0))
    return indices[keep], stats


class _Featurize:
    """grain map: pair index -> its two rows plus their reference log-probs."""

    def __init__(self, source, tokenizer, seq_len: int, ref_logps: dict):
        self.source, self.tokenizer, self.seq_len, self.ref = source, tokenizer, seq_len, ref_logps

    def __call__(self, index) -> dict:
        rows = pair_rows(self.tokenizer, self.source[int(index)], self.seq_len)
        rows["ref_logp"] = np.asarray(self.ref[int(index)], np.float32)
        return rows


def _flatten(batch: dict) -> dict:
    """[pairs, 2, ...] -> [2 * pairs, ...]: chosen and rejected rows interleaved."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def dpo_dataset(source, tokenizer: ChatTokenizer, kept: np.ndarray, ref_logps: dict, *,
                seq_len: int, pairs_per_batch: int, seed: int, shuffle: bool = True,
                num_epochs: Optional[int] = None, read_threads: int = 2) -> grain.IterDataset:
    """Batches of `pairs_per_batch` pairs as [2 * pairs, seq_len] rows + "ref_logp" [2 * pairs].

    ref_logps: pair index -> (reference log-prob of chosen, of rejected)."""
    ds = grain.MapDataset.source(kept)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Featurize(source, tokenizer, seq_len, ref_logps))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=2 * pairs_per_batch))
    return ds.batch(pairs_per_batch, drop_remainder=True).map(_flatten)


def pair_batches(source, tokenizer: ChatTokenizer, indices: np.ndarray, seq_len: int,
                 pairs_per_batch: int):
    """In-order batches (indices, rows) over `indices`, the last one padded by repetition —
    for scoring every pair once (reference log-probs, held-out evaluation)."""
    for start in range(0, len(indices), pairs_per_batch):
        part = list(indices[start:start + pairs_per_batch])
        n = len(part)
        part += [part[-1]] * (pairs_per_batch - n)
        rows = [pair_rows(tokenizer, source[int(i)], seq_len) for i in part]
        yield np.asarray(part[:n]), _flatten({k: np.stack([r[k] for r in rows])
                                              for k in rows[0]})
