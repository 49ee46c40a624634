"""RL rows that hold several responses (`rl.pack_responses`).

A rollout's kept responses, one per right-padded row of `data.seq_len` tokens, are packed
first-fit into fewer rows of the same length. The prompt + completion of a demo response is
~135 of 256 tokens, so one response per row spent half of every RL step on padding.
"""

from __future__ import annotations

import numpy as np


def packs_responses(rl) -> bool:
    """Whether RL rows hold several responses: `rl.pack_responses` with GRPO and token
    aggregation (the per-row computations of PPO's GAE and of sequence means need one response
    per row; with them the flag is ignored, with a warning at the start)."""
    return bool(rl.get("pack_responses")) and rl.algorithm == "grpo" and \
        rl.aggregation == "token"


def pack_responses(rows: dict, first: np.ndarray) -> tuple[dict, list]:
    """One-response rows -> rows of the same length that hold several responses each.

    Responses go first-fit in order of decreasing length into rows of `seq_len` tokens; each
    keeps its own segment id (attention stays within it) and its positions from 0, so its
    tokens see exactly what they saw in their own row. Per-response values become per-token
    (`advantages`); per-batch ones (`long_rope`, `temperature`, `vocab_limit`: one rollout's)
    are the first response's. Returns (packed rows, each response's (row, column of its first
    generated token), in the input order)."""
    n, t = rows["inputs"].shape
    lengths = (rows["segment_ids"] > 0).sum(axis=1)
    fill: list = []  # tokens used per packed row
    where = [None] * n
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= t), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        where[i] = (row, fill[row])
        fill[row] += int(lengths[i])
    m = len(fill)
    out = {k: np.zeros((m, t), rows[k].dtype) for k in
           ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    out["advantages"] = np.zeros((m, t), np.float32)
    segments = [0] * m
    for i, (row, col) in enumerate(where):
        k = int(lengths[i])
        segments[row] += 1
        for key in ("inputs", "targets", "loss_mask", "positions"):
            out[key][row, col:col + k] = rows[key][i, :k]
        out["segment_ids"][row, col:col + k] = segments[row]
        out["advantages"][row, col:col + k] = rows["advantages"][i]
    for key in ("long_rope", "temperature", "vocab_limit"):
        out[key] = np.full((m,), rows[key][0], rows[key].dtype)
    out["rewards"] = np.zeros((m,), np.float32)  # per response; not used after scoring
    out["keep"] = np.ones((m,), bool)
    return out, [(row, col + int(f)) for (row, col), f in zip(where, first)]
