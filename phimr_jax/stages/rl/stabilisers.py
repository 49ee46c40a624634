"""The paper's three RL stabilisers (section 3.4), as small pure pieces with their own metrics.

1. Temperature annealing: linear from `start` (1.0) to `end` (0.6) over the first `fraction`
   of the steps (default 0.5, a secondary source, unverified), then fixed. The value is a traced
   sampler argument, so the schedule never recompiles the sampler.
2. Prompt optimisation: keep prompts whose sampled responses have uniform lengths. Spread of a
   group's lengths = coefficient of variation (std / mean, population std); a prompt is kept
   when it is <= `max_length_cv`.
3. Reward rebalancing: drop prompts whose group accuracy is above `max_accuracy` (default 0.5:
   too easy to teach anything; a group with every response correct is dropped at any threshold:
   its GRPO advantages are all 0); in the kept groups keep every positive response and an equal
   number of randomly chosen negatives (all negatives if there are fewer); oversample hard
   prompts in later batches (`HardPromptSampler`, resumable: its state is a JSON-able dict).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


def annealed_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 0.6,
                         fraction: float = 0.5) -> float:
    """Temperature for optimizer step `step` (0-based) of `total_steps`."""
    span = fraction * total_steps
    if span <= 0 or step >= span:
        return float(end)
    return float(start + (end - start) * step / span)


def length_cv(lengths: Sequence[int]) -> float:
    """Coefficient of variation of a group's response lengths (0 for identical lengths)."""
    lengths = np.asarray(lengths, np.float64)
    mean = lengths.mean()
    return float(lengths.std() / mean) if mean > 0 else 0.0


def uniform_length_prompts(lengths: np.ndarray, max_length_cv: float) -> np.ndarray:
    """Boolean keep-mask over prompts; lengths: [prompts, group_size]."""
    return np.array([length_cv(row) <= max_length_cv for row in lengths], bool)


@dataclasses.dataclass
class Rebalanced:
    """Result of reward rebalancing over [prompts, group_size] groups."""

    keep_prompt: np.ndarray  # [prompts] bool: the prompt's group survives the accuracy filter
    keep_response: np.ndarray  # [prompts, group_size] bool: responses used in the update
    accuracy: np.ndarray  # [prompts] group accuracy (fraction of positive rewards)


def rebalance(rewards: np.ndarray, max_accuracy: float, rng: np.random.Generator) -> Rebalanced:
    """rewards: [prompts, group_size], positive = correct. Drops groups whose accuracy exceeds
    max_accuracy (and groups with every response positive, whose advantages are all 0, so that
    max_accuracy >= 1 means "keep every group that teaches something"), then keeps all positives
    plus as many random negatives per group."""
    positive = rewards > 0
    accuracy = positive.mean(axis=1)
    keep_prompt = (accuracy <= max_accuracy) & (accuracy < 1.0)
    keep = np.zeros_like(positive)
    for p in np.flatnonzero(keep_prompt):
        pos = np.flatnonzero(positive[p])
        neg = np.flatnonzero(~positive[p])
        keep[p, pos] = True
        if len(neg):
            keep[p, rng.choice(neg, size=min(len(pos), len(neg)), replace=False)] = True
    return Rebalanced(keep_prompt, keep, accuracy)


class HardPromptSampler:
    """Draws prompt indices for the next RL batch, oversampling hard prompts.

    Every prompt starts with weight 1; after its group is graded, a prompt whose accuracy is at
    or below `hard_accuracy` gets weight `oversample` (it is drawn that much more often),
    otherwise back to 1. Draws are without replacement within a batch. The state (weights, RNG)
    is a JSON-able dict for checkpoints, so a resumed run draws the same prompts.
    """

    def __init__(self, num_prompts: int, seed: int, oversample: float = 2.0,
                 hard_accuracy: float = 0.25):
        self.weights = np.ones(num_prompts, np.float64)
        self.rng = np.random.default_rng(seed)
        self.oversample, self.hard_accuracy = float(oversample), float(hard_accuracy)

    def draw(self, n: int) -> np.ndarray:
        p = self.weights / self.weights.sum()
        return self.rng.choice(len(self.weights), size=n, replace=False, p=p)

    def update(self, prompts: Sequence[int], accuracy: Sequence[float]) -> None:
        for i, acc in zip(prompts, accuracy):
            self.weights[int(i)] = self.oversample if acc <= self.hard_accuracy else 1.0

    def get_state(self) -> dict:
        return {"weights": self.weights.tolist(), "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], np.float64)
        self.rng.bit_generator.state = state["rng"]

    @property
    def num_hard(self) -> int:
        return int(np.sum(self.weights > 1.0))


def filter_metrics(keep_length: Optional[np.ndarray], rebalanced: Optional[Rebalanced]) -> dict:
    """Counts of prompts kept / dropped by each filter, for the per-step metrics."""
    out = {}
    if keep_length is not None:
        out.update({"filter/length_kept": int(keep_length.sum()),
                    "filter/length_dropped": int((~keep_length).sum())})
    if rebalanced is not None:
        out.update({"filter/accuracy_kept": int(rebalanced.keep_prompt.sum()),
                    "filter/accuracy_dropped": int((~rebalanced.keep_prompt).sum()),
                    "filter/responses_kept": int(rebalanced.keep_response.sum())})
    return out
