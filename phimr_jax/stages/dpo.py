"""Stage 3, rollout DPO (paper section 3.3).

Objective: the sigmoid DPO loss on preference pairs of the same problem — chosen = a verified
correct rollout, rejected = an incorrect one (the rollouts stage 1 discarded):

    loss = -(1 - eps) * log sigma(beta * m) - eps * log sigma(-beta * m) + a * NLL(chosen),
    m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)),

with log-probs summed over the completion tokens only (the rollout and its final <|end|>; the
prompt is not scored), beta = 0.1 by default (the paper does not publish it; 0.1 is the
TRL/Tunix/EasyDeL default), label smoothing eps = 0 by default (conservative DPO when > 0),
NLL(chosen) the chosen completion's per-token negative log-likelihood with weight
a = `dpo.nll_weight` (RPO; 0 = plain DPO, the paper's objective and the phi4_mini default).
Chosen and rejected rows of a pair sit side by side in one batch.

Reference: the initial policy (the stage-2 checkpoint, `init.checkpoint`), frozen. Its
log-probs of every pair are computed ONCE, before training (`prepare`), and saved to
`workdir/dpo_reference.npz`; training then holds a single model in memory, and a resumed run
reuses the saved values instead of rescoring with a policy that has moved. Reference values
enter the loss under stop_gradient.

Paper: LR 5e-7, 1 epoch, 16K tokens (configs/dpo.py:phi4_mini). Simplifications: a local
workdir for the reference file; every process scores every pair (multi-host: the same values
on all hosts); pairs with a side longer than seq_len are dropped and counted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from phimr_jax.data import demo_corpus
from phimr_jax.data.pairs import dpo_dataset, kept_pairs, pair_batches
from phimr_jax.data.sources import open_records
from phimr_jax.model.sampling import generate
from phimr_jax.model.sampling_calls import in_order
from phimr_jax.model.sharding import RunsTogether
from phimr_jax.stages import distill
from phimr_jax.train import losses
from phimr_jax.train.state import replicated_batch
from phimr_jax.train.trainer import Stage, train

log = logging.getLogger(__name__)
REFERENCE_FILE = "dpo_reference.npz"


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
    """(per-pair losses, per-pair beta-scaled margins) of the sigmoid DPO loss."""
    ref_chosen = jax.lax.stop_gradient(ref_chosen)
    ref_rejected = jax.lax.stop_gradient(ref_rejected)
    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin)
            - label_smoothing * jax.nn.log_sigmoid(-margin))
    return loss, margin


def sequence_logps(model, batch: dict, chunk_size: int) -> jax.Array:
    """Sum of the completion tokens' log-probs of every row: [rows]."""
    logp, _ = losses.token_logprobs(model, batch, chunk_size)
    return jnp.sum(logp * batch["loss_mask"], axis=-1)


def pair_loss(model, batch: dict, *, beta: float, label_smoothing: float, chunk_size: int,
              nll_weight: float = 0.0):
    """Trainer loss: (loss_sum, number of pairs, metric sums); rows 2i / 2i+1 = pair i.

    nll_weight: adds nll_weight x the chosen response's per-token negative log-likelihood to
    each pair's loss (RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization").
    Plain DPO only fixes the margin, so it can lower the chosen log-prob too ("likelihood
    displacement"): with pairs that share everything up to one slip, it pushes down correct
    steps along with the wrong one. The NLL term holds the chosen solution's likelihood up."""
    seq = sequence_logps(model, batch, chunk_size)
    ref = batch["ref_logp"]
    pi_c, pi_r, ref_c, ref_r = seq[0::2], seq[1::2], ref[0::2], ref[1::2]
    dpo, margin = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)
    nll = -pi_c / jnp.maximum(jnp.sum(batch["loss_mask"][0::2], axis=-1), 1.0)
    loss = dpo + nll_weight * nll
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    sums = {"loss": loss.sum(), "dpo_loss": dpo.sum(), "nll/chosen": nll.sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(), "rewards/margin": margin.sum(),
            "preference_accuracy": (margin > 0).sum().astype(jnp.float32),
            "logps/chosen": pi_c.sum(), "logps/rejected": pi_r.sum()}
    return loss.sum(), jnp.float32(pi_c.shape[0]), sums


def pair_weight(batch: dict) -> jax.Array:
    return jnp.float32(batch["inputs"].shape[0] // 2)


# ---------------------------------------------------------------------------- data
DEMO_PAIRS = ("whole", "step", "own", "own_steps")
OWN_PAIRS = ("own", "own_steps")  # made from the initial policy's rollouts (prepare_reference)
_NUMBER = re.compile(r" ?-?\d+")


def _demo_pairs(config: ConfigDict) -> dict:
    """Demo pairs from the synthetic corpus, for the training and the held-out problems: the
    correct solution vs the generator's deliberate arithmetic mistake (`dpo.demo_pairs`
    "whole"), or only the first step where they differ, after their shared prefix ("step").
    "own" / "own_steps": training pairs from the initial policy's own rollouts (`own_pairs`,
    written by `prepare_reference`): correct vs incorrect rollouts / the policy's first slips
    as step pairs; held-out pairs as "whole" / "step"."""
    mode = config.dpo.get("demo_pairs", "whole")
    if mode not in DEMO_PAIRS:
        raise ValueError(f"dpo.demo_pairs must be one of {DEMO_PAIRS}, got {mode!r}")
    paths = distill.demo_paths(config)
    out = {}
    for split, src in (("train", paths["train"]), ("heldout", paths["heldout"])):
        out_dir = os.path.dirname(src)
        if mode in OWN_PAIRS and split == "train":
            out[split] = os.path.join(out_dir, f"pairs_{mode}_train.jsonl")
            continue
        file_mode = {"own": "whole", "own_steps": "step"}.get(mode, mode)
        name = f"pairs_{split}.jsonl" if file_mode == "whole" else \
            f"pairs_{file_mode}_{split}.jsonl"
        if not os.path.exists(os.path.join(out_dir, name)):
            rng = random.Random(config.seed + (split == "heldout"))
            distill.publish(out_dir, (name,), lambda tmp: _write_demo_pairs(
                src, os.path.join(tmp, name), rng, steps=file_mode == "step"))
        out[split] = os.path.join(out_dir, name)
    return out


def _write_demo_pairs(src: str, dst: str, rng: random.Random, steps: bool = False) -> None:
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            rec = json.loads(line)
            wrong = demo_corpus.wrong_solution(rec, rng)
            pair = {"chosen": rec["solution"], "rejected": wrong["solution"]}
            if steps:
                prefix, chosen, rejected = demo_corpus.first_slip(rec["solution"],
                                                                  wrong["solution"])
                pair = {"prefix": prefix, "chosen": chosen, "rejected": rejected}
            g.write(json.dumps({"problem": rec["problem"], **pair, "answer": rec["answer"],
                                "difficulty": rec["difficulty"], "domain": rec["domain"]}) + "\n")


def _own_rollouts(model, tokenizer, records: list, *, samples: int, temperature: float,
                  max_new_tokens: int, prompts_per_call: int, seed: int):
    """Yields (record, [(text, finished), ...] of its `samples` completions), sampling
    `prompts_per_call` problems per sampler call in the records' order, lazily: the caller
    stops when it has enough (on a CPU the next call is already running then, `in_order`)."""
    def call(start):
        chunk = records[start:start + prompts_per_call]
        return chunk, generate(model, [tokenizer.prompt_ids(r["problem"]) for r in chunk],
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               num_samples=samples, seed=seed + start,
                               stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                               vocab_limit=tokenizer.vocab_size)

    for chunk, result in in_order(call, range(0, len(records), prompts_per_call)):
        done = [r == "stop" for r in result.finish_reasons]
        texts = [tokenizer.decode(t[:-1] if d else t) for t, d in zip(result.tokens, done)]
        for j, rec in enumerate(chunk):
            rows = range(j * samples, (j + 1) * samples)
            yield rec, [(texts[i], done[i]) for i in rows]


def _step_pairs(rec: dict, completions: list, seen: set, counts: dict) -> list:
    """Step pairs of one problem's completions (see `own_pairs`)."""
    pairs = []
    for text, _ in completions:
        if text == rec["solution"]:
            continue
        counts["departed"] += 1
        prefix, chosen, rejected = demo_corpus.first_slip(rec["solution"], text)
        if not (_NUMBER.fullmatch(chosen) and _NUMBER.fullmatch(rejected)):
            counts["not_a_number"] += 1
        elif (rec["problem"], prefix, rejected) not in seen:
            seen.add((rec["problem"], prefix, rejected))
            pairs.append({"prefix": prefix, "chosen": chosen, "rejected": rejected})
    return pairs


def own_pairs(model, tokenizer, records: list, *, steps: bool, samples: int,
              temperature: float, max_new_tokens: int, max_pairs: int, prompts_per_call: int,
              seed: int) -> tuple[list, dict]:
    """Preference pairs from the policy's own rollouts: `samples` completions of each problem
    at `temperature`, in calls of `prompts_per_call` problems, until `max_pairs`.

    steps=False, rollout pairs (the paper's stage 3): chosen = a finished completion whose
    boxed answer is the gold one, rejected = a finished one whose answer is wrong, one pair per
    problem that has both.
    steps=True, step pairs from the policy's own first mistakes (Step-DPO, Lai et al. 2024,
    with self-generated errors): a completion that departs from the record's solution slips
    where it departs, because a demo solution is the one text its generator writes for the
    problem; the pair is (shared prefix, the solution's next number, the completion's number
    there), at most one per distinct (problem, prefix, rejected). A departure that is not a
    number (a wording or style change, an early stop) gives no pair.

    Returns (pairs: records in the pair schema, steps with `prefix`; counts)."""
    pairs, seen = [], set()
    counts = {"rollouts": 0, "correct": 0, "departed": 0, "not_a_number": 0}
    rollouts = _own_rollouts(model, tokenizer, records, samples=samples,
                             temperature=temperature, max_new_tokens=max_new_tokens,
                             prompts_per_call=prompts_per_call, seed=seed)
    for i, (rec, completions) in enumerate(rollouts, 1):
        right = [done and distill.boxed_answer(text) == rec["answer"]
                 for text, done in completions]
        counts["rollouts"] += len(completions)
        counts["correct"] += sum(right)
        if steps:
            found = _step_pairs(rec, completions, seen, counts)
        else:
            good = [t for (t, _), r in zip(completions, right) if r]
            bad = [t for (t, done), r in zip(completions, right) if done and not r]
            found = [{"chosen": good[0], "rejected": bad[0]}] if good and bad else []
        pairs += [{"problem": rec["problem"], **p, "answer": rec["answer"],
                   "difficulty": rec["difficulty"], "domain": rec["domain"]} for p in found]
        if i % prompts_per_call == 0 and len(pairs) >= max_pairs:
            break  # after a sampler call's last problem: no further call
    rollouts.close()  # waits for a call already running beside the last one
    pairs = pairs[:max_pairs]
    return pairs, {**counts, "pairs": len(pairs)}


def _write_own_pairs(model, tokenizer, config: ConfigDict, path: str) -> None:
    own = config.dpo.own_pairs
    split = own.get("problems", "train")
    if split not in ("train", "fresh"):
        raise ValueError(f"dpo.own_pairs.problems must be train or fresh, got {split!r}")
    with open(distill.demo_paths(config)[split]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    random.Random(config.seed).shuffle(records)
    records = records[:int(own.max_problems)]
    wanted = int(config.data.max_pairs) or len(records)
    pairs, counts = own_pairs(
        model, tokenizer, records, steps=config.dpo.demo_pairs == "own_steps",
        samples=int(own.samples), temperature=float(own.temperature),
        max_new_tokens=int(own.max_new_tokens), max_pairs=wanted,
        prompts_per_call=int(own.prompts_per_call), seed=int(config.seed))
    log.info("%s pairs from the initial policy's rollouts: %s", config.dpo.demo_pairs, counts)
    if not pairs:
        raise ValueError(f"the initial policy's rollouts gave no pair to learn from ({counts})")

    def write(tmp):
        with open(os.path.join(tmp, os.path.basename(path)), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    distill.publish(os.path.dirname(path), (os.path.basename(path),), write)


def pair_files(config: ConfigDict) -> tuple[str, str]:
    train, heldout = config.data.train_files, config.data.eval_pairs
    if config.data.demo:
        pairs = _demo_pairs(config)
        train, heldout = train or pairs["train"], heldout or pairs["heldout"]
    if not train:
        raise ValueError("no preference pairs: set --config.data.train_files=PAIRS.jsonl (the "
                         "curate stage's dpo_pairs.jsonl) or data.demo")
    return train, heldout


def _open_pairs(config: ConfigDict, files: str):
    fields = dict(config.data.fields)
    return open_records(files, fields=fields, required=("problem", "chosen", "rejected"),
                        skip_malformed=config.data.skip_malformed)


def _score_pairs(model, source, tokenizer, indices, config) -> np.ndarray:
    """[len(indices), 2] summed completion log-probs (chosen, rejected) under `model`."""
    mesh = jax.sharding.get_abstract_mesh()
    chunk = int(config.loss.chunk_size)
    per_batch = max(1, config.data.global_batch_size // 2)
    out_sharding = NamedSharding(jax.sharding.get_mesh(), PartitionSpec()) \
        if not mesh.empty else None
    score = RunsTogether(jax.jit(lambda m, b: sequence_logps(m, b, chunk),
                                 out_shardings=out_sharding))
    result = np.zeros((len(indices), 2), np.float32)
    at = 0
    for idx, rows in pair_batches(source, tokenizer, indices, config.data.seq_len, per_batch):
        rows = {k: replicated_batch(v) for k, v in rows.items() if k != "ref_logp"}
        seq = np.asarray(score(model, rows)).reshape(-1, 2)
        result[at:at + len(idx)] = seq[:len(idx)]
        at += len(idx)
    return result


def prepare_reference(model, tokenizer, config: ConfigDict, resumed: bool) -> None:
    """Score every kept training pair and every held-out pair under the initial policy."""
    path = os.path.join(os.path.abspath(config.workdir), REFERENCE_FILE)
    if os.path.exists(path):
        return
    if resumed:
        raise FileNotFoundError(f"resuming DPO needs the reference log-probs {path}, which are "
                                "gone; start a fresh run directory")
    train_files, heldout_files = pair_files(config)
    if config.data.demo and not config.data.train_files and \
            config.dpo.get("demo_pairs") in OWN_PAIRS and not os.path.exists(train_files):
        _write_own_pairs(model, tokenizer, config, train_files)
    arrays = {}
    for split, files in (("train", train_files), ("heldout", heldout_files)):
        if not files or (split == "heldout" and not config.eval_every_steps):
            continue  # held-out pairs are only scored for the evaluation
        source = _open_pairs(config, files)
        kept, stats = kept_pairs(source, tokenizer, config.data.seq_len,
                                 limit=config.data.max_pairs if split == "train" else 0)
        log.info("scoring %d %s pairs under the reference policy (%s)", len(kept), split, stats)
        arrays[f"{split}_index"] = kept
        arrays[f"{split}_ref"] = _score_pairs(model, source, tokenizer, kept, config)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)


def _reference(config: ConfigDict, split: str) -> dict:
    with np.load(os.path.join(os.path.abspath(config.workdir), REFERENCE_FILE)) as f:
        if f"{split}_index" not in f:
            return {}
        return {int(i): tuple(r) for i, r in zip(f[f"{split}_index"], f[f"{split}_ref"])}


def make_data(config: ConfigDict, tokenizer):
    train_files, _ = pair_files(config)
    source = _open_pairs(config, train_files)
    count, index = jax.process_count(), jax.process_index()
    if config.data.global_batch_size % (2 * count):
        raise ValueError("data.global_batch_size counts rows (2 per pair) and must divide "
                         "evenly over processes")
    kept, stats = kept_pairs(source, tokenizer, config.data.seq_len, index, count,
                             limit=config.data.max_pairs)
    ref = _reference(config, "train")
    dataset = dpo_dataset(source, tokenizer, kept, ref, seq_len=config.data.seq_len,
                          pairs_per_batch=config.data.global_batch_size // 2 // count,
                          seed=config.seed, shuffle=config.data.shuffle,
                          read_threads=config.data.read_threads)
    out = stats.as_dict()
    out["rows_per_epoch"] = 2 * stats.num_kept * count
    return dataset, out


def evaluate(model, tokenizer, config: ConfigDict) -> dict:
    """Held-out pairs (preference accuracy, margin, rewards) + held-out greedy accuracy."""
    out = {}
    _, heldout = pair_files(config)
    ref = _reference(config, "heldout")
    if heldout and ref:
        source = _open_pairs(config, heldout)
        indices = np.array(sorted(ref), np.int64)
        pi = _score_pairs(model, source, tokenizer, indices, config)
        refs = np.array([ref[int(i)] for i in indices], np.float32)
        beta = config.dpo.beta
        margin = beta * ((pi[:, 0] - refs[:, 0]) - (pi[:, 1] - refs[:, 1]))
        out.update({"eval/pair_accuracy": float(np.mean(margin > 0)),
                    "eval/pair_margin": float(np.mean(margin)),
                    "eval/reward_chosen": float(np.mean(beta * (pi[:, 0] - refs[:, 0]))),
                    "eval/reward_rejected": float(np.mean(beta * (pi[:, 1] - refs[:, 1])))})
    if config.data.eval_files or config.data.demo:
        out.update(distill.heldout_accuracy(model, tokenizer, config))
    return out


def make_stage(config: ConfigDict) -> Stage:
    loss = functools.partial(pair_loss, beta=float(config.dpo.beta),
                             label_smoothing=float(config.dpo.label_smoothing),
                             nll_weight=float(config.dpo.get("nll_weight", 0.0)),
                             chunk_size=int(config.loss.chunk_size))
    return Stage(name="dpo", make_data=make_data, loss_fn=loss, weight_fn=pair_weight,
                 evaluate=evaluate, tokenizer_fn=distill.resolve_tokenizer,
                 prepare=prepare_reference)


def run(config: ConfigDict) -> dict:
    return train(config, make_stage(config))


__all__ = ["dpo_loss", "pair_loss", "run"]
