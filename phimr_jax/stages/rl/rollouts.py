"""The RL batch iterator: rollouts from the policy being trained, graded, filtered, scored.

The shared trainer hands the iterator the current parameters before every step
(`use_params`); when its queue of minibatches is empty it makes a new rollout batch:

1. temperature from the annealing schedule at the current optimizer step;
2. `prompts_per_rollout` prompts drawn by the `HardPromptSampler` (hard prompts oversampled);
3. `group_size` completions per prompt from our sampler with the policy's current parameters
   (same process, no weight copies), in calls of `rl.prompts_per_call` prompts formed by
   prompt length, all in one fixed LongRoPE regime so the trainer encodes positions exactly
   as the sampler did;
4. +1 / -1 from the Math-Verify reward pool (a completion cut at max_new_tokens gets -1 unless
   `rl.truncated_is_wrong` is off: it never finished its answer);
5. advantages over the whole groups (GRPO: group-normalised; PPO: GAE on the critic's values,
   whitened over the batch), THEN the prompt filters (uniform lengths; accuracy threshold +
   positive/negative rebalancing) choose the responses that are trained on;
6. the old log-probs by the trainer's own forward pass on the current parameters (the same
   function and microbatch shape as the loss, so the importance ratio of the first minibatch is
   1 up to the last bit); the sampler's log-probs are compared with them as a per-step check;
   the reference's log-probs when a KL penalty is on; only for the responses the filters kept;
7. kept responses shuffled into minibatches of `data.global_batch_size` rows (the last one
   padded with rows that weigh nothing), repeated for `updates_per_rollout` epochs (mu).
   With `rl.pack_responses` (GRPO, token aggregation) a row holds several responses, each its
   own segment (`pack_responses`), packed before the old log-probs are scored, so steps 6-7
   see the same rows.

Its state (optimizer step, rollout count, prompt sampler weights + RNG, filter RNG) is JSON and
goes into every checkpoint; checkpoints are only taken between rollout batches
(`at_checkpoint_boundary`), so a resumed run redraws exactly the prompts it would have drawn.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phimr_jax.model.actor_critic import PARAM_LAYOUTS
from phimr_jax.model.sampling import rope_regime
from phimr_jax.model.sampling_calls import generate_in_calls
from phimr_jax.model.sharding import RunsTogether, gather_to_every_process
from phimr_jax.stages.rl import objectives as obj
from phimr_jax.stages.rl import stabilisers as st
from phimr_jax.stages.rl.packing import pack_responses, packs_responses

log = logging.getLogger(__name__)

# Metrics every step reports (the last rollout's values between rollouts).
METRIC_KEYS = (
    "rollout/reward_mean", "rollout/accuracy", "rollout/length_mean", "rollout/length_std",
    "rollout/truncated_fraction", "rollout/temperature", "rollout/sampler_logp_diff",
    "rollout/responses_kept", "rollout/hard_prompts", "rollout/empty_rollouts",
    "filter/length_kept", "filter/length_dropped", "filter/accuracy_kept",
    "filter/accuracy_dropped", "time/rollout_s", "time/sample_s", "time/grade_s",
    "time/score_s", "time/update_s")
# Per difficulty level of the prompts (when they carry one, and at most this many levels):
# completions drawn, correct and kept by the filters in the last rollout. Counts, not ratios,
# so a level the rollout drew no prompt of reads 0 instead of an undefined accuracy.
MAX_LEVEL_METRICS = 12
LEVEL_METRICS = ("completions", "correct", "kept")


def level_key(level: str, metric: str) -> str:
    return f"rollout/level_{level}/{metric}"


def level_metric_keys(prompts: list) -> tuple[list, tuple]:
    """(the prompts' difficulty levels, sorted; their metric keys): none when the prompts have
    no levels or more than MAX_LEVEL_METRICS of them."""
    levels = {p.get("level") for p in prompts} - {None}
    if not levels or len(levels) > MAX_LEVEL_METRICS:
        return [], ()
    levels = sorted(levels, key=lambda v: (float(v), v))
    return levels, tuple(level_key(lv, m) for lv in levels for m in LEVEL_METRICS)


class RolloutIterator:
    """Iterator of per-process RL minibatches (see module docstring)."""

    def __init__(self, config, tokenizer, prompts: list, pool, *, total_steps: int,
                 layout: str, score_fn: Callable, reference=None):
        self.config, self.rl, self.tokenizer = config, config.rl, tokenizer
        self.prompts, self.pool, self.total_steps = prompts, pool, total_steps
        self.policy_of = PARAM_LAYOUTS[layout][1]  # the trained module -> the policy
        self.score_fn, self.reference = score_fn, reference
        self.sampler = st.HardPromptSampler(len(prompts), seed=config.seed,
                                            oversample=self.rl.oversample,
                                            hard_accuracy=self.rl.hard_accuracy)
        self.rng = np.random.default_rng(config.seed + 1)
        self.step = 0  # optimizer steps whose batch this iterator has produced
        self.rollouts = 0
        self.pending: list = []
        self.levels, level_keys = level_metric_keys(prompts)
        self.metrics = {k: 0.0 for k in METRIC_KEYS + level_keys}
        self._module = None
        self._last_rollout_end: Optional[float] = None

    # -------------------------------------------------------------- trainer protocol
    def __iter__(self):
        return self

    def use_params(self, graphdef, params, step: int) -> None:
        self._module = (graphdef, params)
        self.step = step

    @property
    def at_checkpoint_boundary(self) -> bool:
        return not self.pending

    def pop_metrics(self) -> dict:
        return dict(self.metrics)

    def get_state(self) -> dict:
        return {"step": self.step, "rollouts": self.rollouts, "sampler": self.sampler.get_state(),
                "rng": self.rng.bit_generator.state}

    def set_state(self, state) -> None:
        state = json.loads(state) if isinstance(state, (bytes, str)) else state
        self.step, self.rollouts = int(state["step"]), int(state["rollouts"])
        self.sampler.set_state(state["sampler"])
        self.rng.bit_generator.state = state["rng"]
        self.pending = []

    def start_prefetch(self) -> None:  # grain's restore calls this; nothing to prefetch
        pass

    def __next__(self) -> dict:
        if not self.pending:
            self._new_rollout_batch()
        batch = self.pending.pop(0)
        count, index = jax.process_count(), jax.process_index()
        rows = len(batch["inputs"]) // count
        return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}

    # -------------------------------------------------------------- one rollout batch
    def temperature(self, step: int) -> float:
        t = self.rl.temperature
        if not t.anneal:
            return float(t.start)
        return st.annealed_temperature(step, self.total_steps, t.start, t.end, t.anneal_fraction)

    def _new_rollout_batch(self) -> None:
        if self._module is None:
            raise RuntimeError("RolloutIterator needs use_params() before next()")
        graphdef, params = self._module
        jax.block_until_ready(params)  # the previous updates are done: time them
        now = time.perf_counter()
        update_s = now - self._last_rollout_end if self._last_rollout_end else 0.0
        module = nnx.merge(graphdef, params)
        for attempt in range(int(self.rl.max_empty_rollouts) + 1):
            kept = self._rollout(module)
            if kept:
                break
            self.metrics["rollout/empty_rollouts"] += 1
            log.warning("rollout %d kept no responses (all filtered); sampling again",
                        self.rollouts)
        else:
            raise ValueError(f"{self.rl.max_empty_rollouts + 1} rollout batches in a row had "
                             "every response filtered out (groups all right or all wrong); "
                             "loosen rl.max_accuracy / rl.max_length_cv or check the prompts")
        self._last_rollout_end = time.perf_counter()
        self.metrics["time/rollout_s"] = self._last_rollout_end - now
        self.metrics["time/update_s"] = update_s

    def _rollout(self, module) -> int:
        rl, tok = self.rl, self.tokenizer
        policy = self.policy_of(module)
        temperature = self.temperature(self.step)
        idx = self.sampler.draw(int(rl.prompts_per_rollout))
        prompts = [self.prompts[i] for i in idx]
        g = int(rl.group_size)
        t0 = time.perf_counter()
        # One LongRoPE regime for every sampler call of the batch: the one `_rows` gives the
        # trainer (longest prompt + max_new_tokens).
        longest = max(len(p["prompt_ids"]) for p in prompts) + int(rl.max_new_tokens)
        per_call = int(rl.get("prompts_per_call", 0))
        seed = int(self.config.seed) * 1_000_003 + self.rollouts
        if 0 < per_call < len(prompts):  # each call of each rollout its own seed
            seed *= len(prompts)
        result = generate_in_calls(
            policy, [p["prompt_ids"] for p in prompts], prompts_per_call=per_call, seed=seed,
            num_samples=g, max_new_tokens=int(rl.max_new_tokens), temperature=temperature,
            top_p=float(rl.top_p), stop_tokens=tok.stop_ids, rope_mode="fixed",
            fixed_length=longest, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        self.rollouts += 1
        t1 = time.perf_counter()
        texts = [tok.decode(t[:-1] if r == "stop" else t)
                 for t, r in zip(result.tokens, result.finish_reasons)]
        answers = [p["answer"] for p in prompts for _ in range(g)]
        correct = self.pool.grade(texts, answers)
        t2 = time.perf_counter()
        self.metrics.update({"time/sample_s": t1 - t0, "time/grade_s": t2 - t1})
        truncated = np.array([r == "length" for r in result.finish_reasons])
        if rl.truncated_is_wrong:
            correct = correct & ~truncated
        rewards = np.where(correct, 1.0, -1.0).reshape(-1, g)
        lengths = np.asarray(result.lengths).reshape(-1, g)
        accuracy = (rewards > 0).mean(axis=1)
        self.sampler.update(idx, accuracy)

        keep_length = st.uniform_length_prompts(lengths, rl.max_length_cv) \
            if rl.length_filter else np.ones(len(idx), bool)
        rebalanced = st.rebalance(rewards, rl.max_accuracy, self.rng) if rl.rebalance else None
        keep = keep_length[:, None] & (rebalanced.keep_response if rebalanced is not None
                                       else np.ones_like(rewards, bool))
        self.metrics.update({
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/accuracy": float((rewards > 0).mean()),
            "rollout/length_mean": float(lengths.mean()),
            "rollout/length_std": float(lengths.std()),
            "rollout/truncated_fraction": float(truncated.mean()),
            "rollout/temperature": temperature,
            "rollout/responses_kept": float(keep.sum()),
            "rollout/hard_prompts": float(self.sampler.num_hard)})
        counts = {"filter/accuracy_kept": len(idx), "filter/accuracy_dropped": 0,
                  **st.filter_metrics(keep_length, rebalanced)}
        self.metrics.update({k: float(counts[k]) for k in METRIC_KEYS if k in counts})
        self._level_metrics(prompts, rewards, keep)
        if not keep.any():
            return 0
        rows = self._rows(policy.config, prompts, result, rewards, keep, temperature, longest)
        t3 = time.perf_counter()
        rows = self._score(module, rows, result)
        self.metrics["time/score_s"] = time.perf_counter() - t3
        self._minibatches(rows)
        return int(keep.sum())

    def _level_metrics(self, prompts: list, rewards: np.ndarray, keep: np.ndarray) -> None:
        """Per-level counts of the rollout's completions ([prompts, G] rewards and keep)."""
        levels = np.array([p.get("level") for p in prompts], object)
        for lv in self.levels:
            rows = levels == lv
            counts = (rewards[rows].size, (rewards[rows] > 0).sum(), keep[rows].sum())
            self.metrics.update({level_key(lv, m): float(n)
                                 for m, n in zip(LEVEL_METRICS, counts)})

    def _rows(self, model_config, prompts, result, rewards, keep, temperature,
              longest: int) -> dict:
        """Right-padded training rows of every response (filtering happens after scoring, so the
        advantages see whole groups)."""
        t, g = int(self.config.data.seq_len), int(self.rl.group_size)
        n = len(result.tokens)
        rows = {"inputs": np.full((n, t), self.tokenizer.pad_id, np.int32),
                "targets": np.full((n, t), self.tokenizer.pad_id, np.int32),
                "loss_mask": np.zeros((n, t), np.float32),
                "positions": np.zeros((n, t), np.int32),
                "segment_ids": np.zeros((n, t), np.int32)}
        for i, toks in enumerate(result.tokens):
            ids = list(prompts[i // g]["prompt_ids"]) + list(toks)
            k = len(ids) - 1
            rows["inputs"][i, :k], rows["targets"][i, :k] = ids[:-1], ids[1:]
            rows["loss_mask"][i, len(prompts[i // g]["prompt_ids"]) - 1:k] = 1.0
            rows["positions"][i, :k] = np.arange(k)
            rows["segment_ids"][i, :k] = 1
        # The regime the sampler used: longest prompt + max_new_tokens (see sampling.py).
        long_rope = rope_regime(model_config, longest)
        rows["long_rope"] = np.full((n,), int(long_rope), np.int32)
        # The policy trained is the one sampled: softmax(logits / T) (TRL / verl do the same).
        rows["temperature"] = np.full((n,), temperature, np.float32)
        # ...over the ids the sampler may draw (`vocab_limit`: not the padded embedding rows).
        rows["vocab_limit"] = np.full((n,), self.tokenizer.vocab_size, np.int32)
        rows["rewards"] = rewards.reshape(-1).astype(np.float32)
        rows["keep"] = keep.reshape(-1)
        return rows

    def _score(self, module, rows, result) -> dict:
        """The algorithm's advantages over whole groups, then the kept responses only: their old
        log-probs (+ values, reference log-probs) with the trainer's forward. Only kept rows
        are scored: with the demo's mostly-right groups that is 30-230 of 512 responses, and
        scoring was a third of the rollout's time."""
        g = int(self.rl.group_size)
        if self.rl.algorithm == "grpo":  # needs every reward of the group
            adv = obj.group_advantages(jnp.asarray(rows["rewards"]), g, self.rl.scale_rewards)
            rows["advantages"] = np.asarray(adv, np.float32)
        kept = np.flatnonzero(rows["keep"])
        rows = {k: v[kept] for k, v in rows.items()}
        # Where each kept response's first generated token sits: (row, column).
        first = np.argmax(rows["loss_mask"] > 0, axis=1)
        spans = list(zip(range(len(kept)), first))
        if packs_responses(self.rl):
            rows, spans = pack_responses(rows, first)
        rows.update(self.score_fn(module, self.reference, rows))
        mask = rows["loss_mask"]
        diffs = []
        for (row, start), j in zip(spans, kept):
            lp = result.sampling_logprobs[j]
            diffs.append(np.max(np.abs(rows["old_logp"][row, start:start + len(lp)] - lp)))
        self.metrics["rollout/sampler_logp_diff"] = float(np.max(diffs))
        if self.rl.algorithm != "grpo":  # GAE runs per response: the kept ones suffice
            token_rewards = obj.terminal_rewards(jnp.asarray(rows["rewards"]), jnp.asarray(mask))
            adv, ret = obj.gae(token_rewards, jnp.asarray(rows["old_values"]), jnp.asarray(mask),
                               self.rl.ppo.gamma, self.rl.ppo.lam)
            rows["advantages"] = np.asarray(obj.normalize_advantages(adv, mask), np.float32)
            rows["returns"] = np.asarray(ret, np.float32)
        return rows

    def _minibatches(self, rows) -> None:
        keep = rows.pop("keep")
        rows.pop("rewards")
        kept = np.flatnonzero(keep)
        b = int(self.config.data.global_batch_size)
        n_batches = -(-len(kept) // b)
        fresh = True
        for _ in range(int(self.rl.updates_per_rollout)):
            order = self.rng.permutation(kept)
            for j in range(n_batches):
                take = order[j * b:(j + 1) * b]
                batch = {k: v[take] for k, v in rows.items()}
                if len(take) < b:  # pad with rows that carry no loss
                    pad = b - len(take)
                    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                             for k, v in batch.items()}
                    batch["long_rope"][len(take):] = batch["long_rope"][0]
                    batch["temperature"][len(take):] = batch["temperature"][0]
                    batch["vocab_limit"][len(take):] = batch["vocab_limit"][0]
                # 1 on the first minibatch after sampling: its importance ratio must be 1.
                batch["fresh"] = np.full((b,), float(fresh), np.float32)
                fresh = False
                self.pending.append(batch)


def make_score_fn(config, layout: str, chunk_rows: int) -> Callable:
    """(module, reference or None, rows) -> {"old_logp", "ref_logp", ["old_values"]} numpy,
    computed by the loss's own forward in microbatches of `chunk_rows` rows."""
    from phimr_jax.train.losses import token_logprobs
    from phimr_jax.train.state import replicated_batch
    chunk = int(config.loss.chunk_size)

    @RunsTogether
    @jax.jit
    def policy_logp(model, batch):
        return token_logprobs(model, batch, chunk, long_rope=batch["long_rope"][0] > 0,
                              temperature=batch["temperature"],
                              vocab_limit=batch["vocab_limit"][0])[0]

    @RunsTogether
    @jax.jit
    def values(module, batch):
        return module.values(batch["inputs"], batch["positions"], batch["segment_ids"],
                             long_rope=batch["long_rope"][0] > 0)

    def run(fn, model, rows) -> np.ndarray:
        n = len(rows["inputs"])
        out = []
        for s in range(0, n, chunk_rows):
            part = {k: rows[k][s:s + chunk_rows] for k in
                    ("inputs", "targets", "positions", "segment_ids", "long_rope", "temperature",
                              "vocab_limit")}
            short = chunk_rows - len(part["inputs"])
            if short:
                part = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)])
                        for k, v in part.items()}
            got = fn(model, {k: replicated_batch(v) for k, v in part.items()})
            if jax.process_count() > 1:  # every process keeps the whole rollout batch
                got = gather_to_every_process(got)
            out.append(np.asarray(got)[:chunk_rows - short])
        return np.concatenate(out)

    policy_of = PARAM_LAYOUTS[layout][1]

    def score(module, reference, rows) -> dict:
        policy = policy_of(module)
        out = {"old_logp": run(policy_logp, policy, rows)}
        out["ref_logp"] = run(policy_logp, reference, rows) if reference is not None \
            else out["old_logp"]
        if layout == "actor_critic":
            out["old_values"] = run(values, module, rows).astype(np.float32)
        return out
    return score
