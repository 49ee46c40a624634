"""Stage 4: RL with verifiable reward (paper section 3.4) — GRPO (default) or PPO.

Objective (GRPO, DeepSeekMath): for each prompt, G completions from the current policy; reward
+1 / -1 from Math-Verify; advantage = the reward normalised within its prompt's group; loss =
clipped importance-ratio surrogate (eps) + optional beta * k3 KL to the frozen reference,
aggregated per token or per sequence (`objectives.py` documents each choice), optimised for
`updates_per_rollout` (mu) passes over each rollout batch. PPO (`rl.algorithm=ppo`): the same
surrogate with per-token GAE advantages from a learned critic — a copy of the policy with a
zero-initialised value head (`model/actor_critic.py`) — plus a clipped value loss, both trained
by the one optimizer.

The paper's stabilisers, each a switch with its own metrics: temperature annealing 1.0 -> 0.6
over the first `anneal_fraction` of the steps (`rollout/temperature`); prompt optimisation by
length uniformity (`filter/length_*`); reward rebalancing — hard prompts oversampled, groups
above `max_accuracy` dropped, all positives + as many negatives kept (`filter/accuracy_*`,
`rollout/hard_prompts`). Rollouts are sampled in this process from the parameters being
trained (`rollouts.py`).

Simplifications (documented): a completion cut at max_new_tokens gets -1; the filters run online
on each rollout batch (not a separate pass over the prompt set); the reference for the KL term
is the run's initial model (`init.checkpoint` / `init.hf_dir`), reloaded on resume; with the KL
off the reported `kl` is the k3 estimate against the rollout policy (how far the mu updates
moved it). Multi-process: every process samples the same rollout batch (same prompts and
seeds) and trains on its slice of each minibatch.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from phimr_jax.data.pipelines import difficulty_value
from phimr_jax.data.sources import open_records
from phimr_jax.evaluation.rewards import RewardPool
from phimr_jax.stages import distill
from phimr_jax.stages.rl import objectives as obj
from phimr_jax.stages.rl.packing import packs_responses
from phimr_jax.stages.rl.rollouts import RolloutIterator, make_score_fn
from phimr_jax.train import checkpointing, losses
from phimr_jax.train.config_base import mesh_and_rules
from phimr_jax.train.trainer import Stage, train

log = logging.getLogger(__name__)
CURVES_FILE = "rl_curves.png"


# ---------------------------------------------------------------------------- losses
def _policy_terms(model, batch, chunk_size):
    logp, _, entropy = losses.token_logprobs(model, batch, chunk_size,
                                             long_rope=batch["long_rope"][0] > 0,
                                             with_entropy=True,
                                             temperature=batch["temperature"],
                                             vocab_limit=batch["vocab_limit"][0])
    return logp, entropy


def _common_sums(logp, entropy, batch, mode, was_clipped):
    """Metric sums shared by GRPO and PPO (normalised like the loss by the trainer)."""
    mask = batch["loss_mask"]
    ratio = jnp.exp(logp - batch["old_logp"])
    agg = functools.partial(obj.aggregate_sum, mask=mask, mode=mode)
    return {"clip_fraction": agg(was_clipped)[0], "entropy": agg(entropy)[0],
            "kl": agg(obj.k3_kl(logp, batch["ref_logp"]))[0],
            # |ratio - 1| on the first minibatch after sampling: 0 when the old log-probs are
            # the current policy's (it is 0 on other minibatches by construction of `fresh`).
            "ratio_dev_fresh": agg(jnp.abs(ratio - 1.0) * batch["fresh"][:, None])[0]}


def grpo_batch_loss(model, batch, *, clip_eps, kl_beta, aggregation, chunk_size):
    """Trainer loss of GRPO: (loss_sum, weight, metric sums)."""
    logp, entropy = _policy_terms(model, batch, chunk_size)
    per_token, was_clipped, _ = obj.grpo_per_token(
        logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], clip_eps=clip_eps,
        kl_beta=kl_beta)
    loss_sum, weight = obj.aggregate_sum(per_token, batch["loss_mask"], aggregation)
    sums = {"loss": loss_sum, **_common_sums(logp, entropy, batch, aggregation, was_clipped)}
    return loss_sum, weight, sums


def ppo_batch_loss(module, batch, *, clip_eps, value_clip_eps, value_coef, aggregation,
                   chunk_size):
    """Trainer loss of PPO on an ActorCritic: (loss_sum, weight, metric sums)."""
    logp, entropy = _policy_terms(module.policy, batch, chunk_size)
    values = module.values(batch["inputs"], batch["positions"], batch["segment_ids"],
                           long_rope=batch["long_rope"][0] > 0)
    policy, value, was_clipped = obj.ppo_per_token(
        logp, batch["old_logp"], values, batch["old_values"], batch["advantages"],
        batch["returns"], clip_eps=clip_eps, value_clip_eps=value_clip_eps)
    mask = batch["loss_mask"]
    policy_sum, weight = obj.aggregate_sum(policy, mask, aggregation)
    value_sum, _ = obj.aggregate_sum(value, mask, aggregation)
    loss_sum = policy_sum + value_coef * value_sum
    sums = {"loss": loss_sum, "policy_loss": policy_sum, "value_loss": value_sum,
            **_common_sums(logp, entropy, batch, aggregation, was_clipped)}
    return loss_sum, weight, sums


def batch_weight(batch, *, aggregation):
    return obj.aggregate_sum(jnp.zeros_like(batch["loss_mask"]), batch["loss_mask"],
                             aggregation)[1]


# ---------------------------------------------------------------------------- data
def prompt_files(config: ConfigDict) -> tuple[str, str]:
    """(RL prompt files, held-out files): configured, or the demo corpus' fresh problems (ones
    stages 1-3 never trained on, as the paper's RL prompts are new to the policy)."""
    files, heldout = distill.data_files(config)
    if config.data.demo and not config.data.train_files:
        files = distill.demo_paths(config)["fresh"]
    return files, heldout


def load_prompts(config: ConfigDict, tokenizer) -> tuple[list, dict]:
    """Prompts with gold answers, tokenised in the chat format; too-long ones dropped."""
    files, _ = prompt_files(config)
    source = open_records(files, fields=dict(config.data.fields), required=("problem", "answer"),
                          skip_malformed=config.data.skip_malformed)
    budget = int(config.data.seq_len) - int(config.rl.max_new_tokens)
    if budget < 2:
        raise ValueError(f"data.seq_len {config.data.seq_len} leaves no room for a prompt "
                         f"beside rl.max_new_tokens {config.rl.max_new_tokens}")
    low, high = float(config.data.min_difficulty), float(config.rl.max_difficulty)
    prompts, too_long, outside = [], 0, 0
    for i in range(len(source)):
        rec = source[i]
        d = difficulty_value(rec.get("difficulty"))
        if (low >= 0 or high >= 0) and (d is None or (low >= 0 and d < low)
                                        or (high >= 0 and d > high)):
            outside += 1
            continue
        ids = tokenizer.prompt_ids(rec["problem"] + config.rl.question_suffix)
        if len(ids) > budget:
            too_long += 1
            continue
        prompts.append({"prompt_ids": ids, "answer": str(rec["answer"]),
                        "level": None if d is None else f"{d:g}"})
    if len(prompts) < config.rl.prompts_per_rollout:
        raise ValueError(f"{len(prompts)} usable RL prompts (of {len(source)}; {too_long} too "
                         f"long, {outside} outside the difficulty range), fewer than "
                         f"rl.prompts_per_rollout={config.rl.prompts_per_rollout}")
    return prompts, {"prompts": len(prompts), "prompts_too_long": too_long,
                     "prompts_outside_difficulty_range": outside}


def _reference(config: ConfigDict):
    """The frozen initial policy for the KL term (None when kl_beta == 0)."""
    if not config.rl.kl_beta:
        return None
    from phimr_jax.train.state import _init_model, with_model_config
    mesh, rules = mesh_and_rules(config)
    model, _, source = _init_model(config, mesh, rules)
    log.info("KL reference: %s", source)
    from phimr_jax.model.dtypes import resolve_compute_dtype
    return with_model_config(model, dtype=resolve_compute_dtype(config.model.dtype))


def check_config(config: ConfigDict) -> None:
    rl = config.rl
    if rl.algorithm not in ("grpo", "ppo"):
        raise ValueError(f"rl.algorithm must be grpo or ppo, got {rl.algorithm!r}")
    if config.total_steps <= 0:
        raise ValueError("RL needs --config.total_steps > 0 (optimizer steps)")
    if rl.group_size < 2:
        raise ValueError("rl.group_size must be >= 2 (advantages are relative to the group)")
    if rl.get("pack_responses") and not packs_responses(rl):
        log.warning("rl.pack_responses is for GRPO with token aggregation (PPO's GAE and "
                    "sequence aggregation work per row): one response per row, "
                    "data.global_batch_size responses per step")
    if config.data.global_batch_size % config.optim.grad_accum_steps:
        raise ValueError("data.global_batch_size must divide by optim.grad_accum_steps")


def make_stage(config: ConfigDict, pool: RewardPool) -> Stage:
    check_config(config)
    rl, chunk = config.rl, int(config.loss.chunk_size)
    layout = "actor_critic" if rl.algorithm == "ppo" else "policy"
    if rl.algorithm == "grpo":
        loss = functools.partial(grpo_batch_loss, clip_eps=float(rl.clip_eps),
                                 kl_beta=float(rl.kl_beta), aggregation=rl.aggregation,
                                 chunk_size=chunk)
    else:
        loss = functools.partial(ppo_batch_loss, clip_eps=float(rl.clip_eps),
                                 value_clip_eps=float(rl.ppo.value_clip_eps),
                                 value_coef=float(rl.ppo.value_coef),
                                 aggregation=rl.aggregation, chunk_size=chunk)

    def make_data(config, tokenizer):
        prompts, stats = load_prompts(config, tokenizer)
        rows = config.data.global_batch_size // config.optim.grad_accum_steps
        score = make_score_fn(config, layout, rows)
        # The trainer calls iter() on it once; the iterator is its own iterator.
        return RolloutIterator(config, tokenizer, prompts, pool,
                               total_steps=int(config.total_steps), layout=layout,
                               score_fn=score, reference=_reference(config)), stats

    return Stage(name="rl", make_data=make_data, loss_fn=loss,
                 weight_fn=functools.partial(batch_weight, aggregation=rl.aggregation),
                 evaluate=distill.heldout_accuracy, tokenizer_fn=distill.resolve_tokenizer,
                 param_layout=layout)


# ---------------------------------------------------------------------------- plot
PLOTTED = ("rollout/reward_mean", "rollout/accuracy", "eval/accuracy", "rollout/temperature",
           "rollout/length_mean", "rollout/length_std", "rollout/truncated_fraction", "kl",
           "clip_fraction", "entropy", "filter/accuracy_dropped", "filter/length_dropped",
           "time/rollout_s", "time/update_s", "loss")


def plot_curves(workdir: str) -> str:
    """`rl_curves.png`: one panel per metric in PLOTTED that the run logged."""
    from phimr_jax.train.metrics import plot_panels, read_metrics
    rows = read_metrics(workdir)
    panels = [(n, [(None, rows, n)]) for n in PLOTTED if any(n in r for r in rows)]
    return plot_panels(os.path.join(os.path.abspath(workdir), CURVES_FILE), panels, cols=4)


def resolve_init(config: ConfigDict) -> None:
    """RL starts from a trained policy. Given neither init.checkpoint nor init.hf_dir (and no
    checkpoint of its own to resume), it takes the DPO run beside its run directory
    (runs/<preset>/dpo for runs/<preset>/rl: the recipe's layout and the stages' defaults) when
    that has a checkpoint; else it stops, naming the command that makes one, unless
    rl.allow_random_init asks for RL on a fresh random model."""
    if (config.init.checkpoint or config.init.hf_dir or not config.workdir
            or checkpointing.latest_step(config.workdir) is not None):
        return
    dpo = os.path.join(os.path.dirname(os.path.abspath(config.workdir)), "dpo")
    if checkpointing.latest_step(dpo) is not None:
        config.init.checkpoint = dpo
        log.info("rl: no init.checkpoint given; starting from the DPO run beside this one: %s", dpo)
        return
    if config.rl.get("allow_random_init"):
        log.warning("rl: RL on a randomly initialised %r model (rl.allow_random_init)",
                    config.model.preset)
        return
    shown = os.path.relpath(dpo) if not os.path.relpath(dpo).startswith("..") else dpo
    make = ("`python -m phimr_jax.main --config=configs/recipe.py` trains it (stages 1-3, then "
            "this RL run)" if config.data.get("demo") else "stage 3 (configs/dpo.py) makes it")
    raise ValueError(f"RL starts from a trained policy and {shown} has no checkpoint: {make}; or "
                     "pass --config.init.checkpoint=RUN_DIR (or --config.init.hf_dir=DIR), or "
                     "--config.rl.allow_random_init=true for RL on a random init")


def run(config: ConfigDict) -> dict:
    resolve_init(config)
    with RewardPool(num_workers=config.rl.reward_workers or None,
                    timeout_s=float(config.rl.reward_timeout_s)) as pool:
        result = train(config, make_stage(config, pool))
    if jax.process_index() == 0:
        path = plot_curves(config.workdir)
        log.info("RL curves: %s", path)
        log.info("last metrics: %s", json.dumps({k: v for k, v in result.items()
                                                  if isinstance(v, (int, float))}))
    return result


__all__ = ["grpo_batch_loss", "ppo_batch_loss", "packs_responses", "run", "plot_curves"]
