"""Stage 4 (RL): the rollout iterator (rows, advantages, filters, scoring, minibatches, state),
the GRPO/PPO batch losses inside the trainer's normalisation, and the CLI (kill/resume, PPO)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phimr_jax.data.tokenizers import load_tokenizer
from phimr_jax.model import sampling
from phimr_jax.model.actor_critic import ActorCritic
from phimr_jax.model.config import preset
from phimr_jax.model.phi3 import init_model
from phimr_jax.stages.rl import stage as rl
from phimr_jax.stages.rl import objectives as obj
from phimr_jax.stages.rl import stabilisers as st
from phimr_jax.stages.rl.rollouts import RolloutIterator, make_score_fn
from phimr_jax.train import checkpointing, losses
from phimr_jax.train.metrics import read_metrics
from tests.data import demo_paths, sp_model, write_jsonl
from tests.test_configs import load
from tests.train.test_metrics import assert_tensorboard_matches_metrics
from tests.stages.test_stages import ROOT, _env, sigkill_after_checkpoint


class FakePool:
    """Grades by a fixed pattern over each call's completions (cycled)."""

    def __init__(self, pattern):
        self.pattern = list(pattern)

    def grade(self, texts, answers):
        return np.array([self.pattern[i % len(self.pattern)] for i in range(len(texts))])


def _config(**rl_overrides):
    c = load("rl", "demo")
    c.data.seq_len = 96
    c.data.global_batch_size = 8
    c.rl.max_new_tokens = 16
    c.rl.prompts_per_rollout = 4
    c.rl.group_size = 4
    c.rl.length_filter = False
    c.rl.truncated_is_wrong = False  # a random model never stops; the fake grader decides
    c.rl.pack_responses = False  # one response per row unless a test packs them
    c.total_steps = 20
    for k, v in rl_overrides.items():
        c.rl[k] = v
    return c


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("sentencepiece", sp_model())
    model = init_model(preset("tiny"), seed=0)
    records = [json.loads(line) for line in open(demo_paths()["train"])]
    prompts = [{"prompt_ids": tok.prompt_ids(r["problem"]), "answer": r["answer"]}
               for r in records]
    prompts = [p for p in prompts if len(p["prompt_ids"]) <= 96 - 16][:12]  # as load_prompts
    return tok, model, prompts


def _iterator(config, setup, pool, layout="policy", module=None):
    tok, model, prompts = setup
    module = module or model
    it = RolloutIterator(config, tok, prompts, pool, total_steps=config.total_steps,
                         layout=layout, score_fn=make_score_fn(config, layout, 8))
    graphdef, params = nnx.split(module, nnx.Param)
    it.use_params(graphdef, params, 0)
    return it


def test_rollout_metrics_count_each_levels_completions(setup):
    tok, model, prompts = setup
    config = _config()
    levelled = [{**p, "level": ("2", "10")[i % 2]} for i, p in enumerate(prompts)]
    # Each group of 4: 1 correct -> kept with 1 negative (rebalanced).
    it = RolloutIterator(config, tok, levelled, FakePool([True, False, False, False]),
                         total_steps=config.total_steps, layout="policy",
                         score_fn=make_score_fn(config, "policy", 8))
    keys = [k for k in it.pop_metrics() if k.startswith("rollout/level_")]
    assert keys == [f"rollout/level_{lv}/{m}" for lv in ("2", "10")
                    for m in ("completions", "correct", "kept")]  # numeric order, from the start
    graphdef, params = nnx.split(model, nnx.Param)
    it.use_params(graphdef, params, 0)
    next(it)
    m = it.pop_metrics()
    per_level = {lv: [m[f"rollout/level_{lv}/{k}"] for k in ("completions", "correct", "kept")]
                 for lv in ("2", "10")}
    assert sum(c for c, _, _ in per_level.values()) == 16
    for completions, correct, kept in per_level.values():
        assert completions == 4 * correct and kept == 2 * correct
    assert sum(kept for _, _, kept in per_level.values()) == m["rollout/responses_kept"]
    # Prompts without a level: no per-level keys.
    assert not [k for k in _iterator(config, setup, FakePool([True])).pop_metrics()
                if k.startswith("rollout/level_")]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_batch_rows_advantages_and_minibatches(setup, temperature):
    tok, model, _ = setup
    config = _config(updates_per_rollout=2)
    config.rl.temperature.anneal, config.rl.temperature.start = False, temperature
    # Each group: 1 correct of 4 -> accuracy 0.25 <= 0.5 kept; 1 positive + 1 negative trained.
    it = _iterator(config, setup, FakePool([True, False, False, False]))
    first = next(it)
    assert not it.at_checkpoint_boundary and len(it.pending) == 1
    second = next(it)
    assert it.at_checkpoint_boundary
    m = it.pop_metrics()
    assert m["rollout/accuracy"] == pytest.approx(0.25)
    assert m["rollout/responses_kept"] == 8 and m["filter/accuracy_dropped"] == 0
    assert m["rollout/temperature"] == pytest.approx(temperature)
    # The sampler's log q == the trainer's forward at the sampling temperature, over the ids the
    # sampler may draw (fixed LongRoPE regime).
    assert m["rollout/sampler_logp_diff"] < 1e-4
    assert first["fresh"].tolist() == [1.0] * 8 and second["fresh"].tolist() == [0.0] * 8
    # Advantages over the WHOLE group [+1, -1, -1, -1] (std ddof=1 = 1), then filtered.
    a_pos, a_neg = 1.5 / (1.0 + obj.STD_EPS), -0.5 / (1.0 + obj.STD_EPS)
    np.testing.assert_allclose(sorted(first["advantages"]), [a_neg] * 4 + [a_pos] * 4,
                               rtol=1e-6)
    # Same 8 responses in both epochs (reshuffled).
    assert sorted(map(tuple, first["inputs"].tolist())) == \
        sorted(map(tuple, second["inputs"].tolist()))
    # Rows: completion tokens masked in, old log-probs = the loss's own forward: softmax of
    # logits / T over the tokenizer's ids (the tiny model's embedding has more rows than it).
    assert first["temperature"].tolist() == [pytest.approx(temperature)] * 8
    assert first["vocab_limit"].tolist() == [tok.vocab_size] * 8 and \
        tok.vocab_size < model.config.vocab_size
    inputs = {k: jnp.asarray(first[k]) for k in ("inputs", "targets", "positions", "segment_ids")}
    logp, _ = losses.token_logprobs(model, inputs, 1024, long_rope=True,
                                    temperature=jnp.full((8,), temperature),
                                    vocab_limit=tok.vocab_size)
    full_vocab_t1, _ = losses.token_logprobs(model, inputs, 1024, long_rope=True)
    assert np.max(np.abs(np.asarray(full_vocab_t1 - logp) * first["loss_mask"])) > 1e-2
    # tiny's original context is 64 tokens: these rows use the long LongRoPE factors, as the
    # sampler did (rope_regime of longest prompt + max_new_tokens).
    assert first["long_rope"].tolist() == [1] * 8
    np.testing.assert_allclose(np.asarray(logp) * first["loss_mask"],
                               first["old_logp"] * first["loss_mask"], atol=1e-5)
    assert np.all(first["loss_mask"].sum(1) >= 1)
    # The importance ratio of the fresh minibatch is 1 and the loss is the token mean.
    batch = {k: jnp.asarray(v) for k, v in first.items()}
    loss_sum, weight, sums = rl.grpo_batch_loss(model, batch, clip_eps=0.2, kl_beta=0.0,
                                                aggregation="token", chunk_size=1024)
    assert float(sums["ratio_dev_fresh"]) / float(weight) < 1e-6
    assert float(weight) == float(first["loss_mask"].sum())
    expected = -np.sum(first["advantages"][:, None] * first["loss_mask"]) / float(weight)
    assert float(loss_sum) / float(weight) == pytest.approx(expected, abs=1e-5)


def _segments(batch):
    """Each response of a batch as (its input ids, its loss mask, its advantage per token)."""
    out = []
    for r in range(len(batch["inputs"])):
        seg = batch["segment_ids"][r]
        for s in sorted(set(seg[seg > 0].tolist())):
            cols = seg == s
            adv = batch["advantages"][r]
            out.append((tuple(batch["inputs"][r, cols]), tuple(batch["loss_mask"][r, cols]),
                        tuple(adv[cols] if adv.ndim else np.full(cols.sum(), adv))))
    return sorted(out)


def test_packed_rows_hold_the_same_responses_and_give_the_same_loss_and_gradient(setup):
    """rl.pack_responses: the kept responses share rows (each its own segment, positions
    from 0); the step trains on the same responses with the same advantages, and its loss,
    token count and gradient equal those of one response per row; the old log-probs are
    scored on the packed rows, so the fresh minibatch's importance ratio is exactly 1."""
    tok, model, _ = setup
    batches = {}
    for pack in (False, True):
        config = _config(updates_per_rollout=1, pack_responses=pack)
        config.data.seq_len = 192  # room for two of these 60-90-token responses in a row
        it = _iterator(config, setup, FakePool([True, False, False, False]))
        batches[pack] = next(it)
        m = it.pop_metrics()
        assert m["rollout/responses_kept"] == 8 and m["rollout/sampler_logp_diff"] < 1e-4
    plain, packed = batches[False], batches[True]
    assert _segments(plain) == _segments(packed)
    assert packed["segment_ids"].max() >= 2  # rows really hold several responses
    rows_used = (packed["segment_ids"] > 0).any(axis=1).sum()
    assert rows_used < 8 and packed["advantages"].ndim == 2
    for r in range(rows_used):  # positions restart at 0 with every segment
        seg = packed["segment_ids"][r]
        for s in set(seg[seg > 0].tolist()):
            assert packed["positions"][r, seg == s].tolist() == list(range((seg == s).sum()))

    def loss_and_grad(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        graphdef, params = nnx.split(model, nnx.Param)

        def f(p):
            total, weight, sums = rl.grpo_batch_loss(nnx.merge(graphdef, p), batch,
                                                     clip_eps=0.2, kl_beta=0.0,
                                                     aggregation="token", chunk_size=1024)
            return total, (weight, sums)
        (total, (weight, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return float(total), float(weight), sums, grads
    a, b = loss_and_grad(plain), loss_and_grad(packed)
    assert a[1] == b[1] == float(plain["loss_mask"].sum())
    # The same per-token terms summed in another order: float32 rounding only.
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert float(b[2]["ratio_dev_fresh"]) / b[1] < 1e-6
    for x, y in zip(jax.tree.leaves(a[3]), jax.tree.leaves(b[3])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    # PPO (GAE per row) and sequence aggregation keep one response per row.
    assert rl.packs_responses(_config(pack_responses=True).rl)
    assert not rl.packs_responses(_config(pack_responses=True, algorithm="ppo").rl)
    assert not rl.packs_responses(_config(pack_responses=True, aggregation="sequence").rl)


def test_filters_drop_easy_groups_and_resample_when_empty(setup):
    config = _config(max_empty_rollouts=1)
    # Every response correct: every group is above 50% accuracy, nothing can be trained on.
    it = _iterator(config, setup, FakePool([True]))
    with pytest.raises(ValueError, match="filtered out"):
        next(it)
    assert it.rollouts == 2  # one retry, then a clear error
    # Rebalancing off: the same batch trains on every response.
    it = _iterator(_config(rebalance=False), setup, FakePool([True, False]))
    next(it)
    assert it.pop_metrics()["rollout/responses_kept"] == 16


def test_temperature_annealing_without_sampler_recompiles(setup):
    config = _config(updates_per_rollout=1)
    config.total_steps = 8
    it = _iterator(config, setup, FakePool([True, False, False, False]))
    seen = []
    for step in range(5):
        it.use_params(*it._module, step)
        next(it)
        seen.append(it.pop_metrics()["rollout/temperature"])
        if step == 0:
            compiled = sampling._sample._cache_size()
    np.testing.assert_allclose(seen, [st.annealed_temperature(s, 8) for s in range(5)])
    np.testing.assert_allclose(seen, [1.0, 0.9, 0.8, 0.7, 0.6])
    assert sampling._sample._cache_size() == compiled


def test_iterator_state_round_trip_redraws_the_same_prompts(setup):
    config = _config(updates_per_rollout=1)
    a = _iterator(config, setup, FakePool([True, False, False, False]))
    next(a)
    state = json.dumps(a.get_state()).encode()  # as the checkpoint stores it
    expected = next(a)
    b = _iterator(config, setup, FakePool([True, False, False, False]))
    b.set_state(state)
    b.use_params(*a._module, a.step)
    got = next(b)
    for k in ("inputs", "advantages", "loss_mask"):
        np.testing.assert_array_equal(got[k], expected[k])


def test_ppo_rollout_values_gae_and_loss(setup):
    tok, model, _ = setup
    module = ActorCritic.from_policy(model)
    assert module.critic.q[...] is not model.q[...]  # a copy, not shared buffers
    config = _config(algorithm="ppo", updates_per_rollout=1)
    it = _iterator(config, setup, FakePool([True, False, False, False]), "actor_critic", module)
    batch = next(it)
    mask = batch["loss_mask"]
    assert np.all(batch["old_values"] == 0)  # zero-initialised value head
    # Values 0, gamma 1: GAE's return of a token k steps before the end is lam^k * reward.
    last = (np.cumsum(mask, 1) == mask.sum(1, keepdims=True)) & (mask > 0)
    rewards = batch["returns"][last]
    assert sorted(rewards.tolist()) == [-1.0] * 4 + [1.0] * 4
    to_end = mask.sum(1, keepdims=True) - np.cumsum(mask, 1)
    np.testing.assert_allclose(batch["returns"] * mask,
                               rewards[:, None] * config.rl.ppo.lam ** to_end * mask, rtol=1e-5)
    params = nnx.state(module, nnx.Param)
    graphdef = nnx.graphdef(module)

    def loss(p):
        out = rl.ppo_batch_loss(nnx.merge(graphdef, p), {k: jnp.asarray(v) for k, v in
                                                       batch.items()}, clip_eps=0.2,
                                value_clip_eps=0.2, value_coef=0.5, aggregation="token",
                                chunk_size=1024)
        return out[0] / out[1]
    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["value_head"][...]).sum()) > 0  # the critic learns
    assert float(jnp.abs(grads["policy"]["q"][...]).sum()) > 0


# ---------------------------------------------------------------------------- CLI
def _prompt_file(tmp_path):
    """Demo problems whose gold answers are single digits: a random model's completions (random
    pieces, digits among them) end in the right number now and then (a few percent of 64
    completions per rollout), so the rewards are mixed from the first step."""
    rows = [dict(json.loads(line), answer=str(i % 10))
            for i, line in enumerate(open(demo_paths()["train"]))][:40]
    return write_jsonl(str(tmp_path / "prompts.jsonl"), rows)


def test_demo_rl_prompts_are_the_fresh_problems(tmp_path):
    """The demo's RL prompts are the corpus' fresh split (not the problems stages 1-2 trained
    on, nor the held-out ones); configured prompt files win."""
    c = load("rl", "demo")
    c.workdir = str(tmp_path / "rl")
    c.data.demo_train, c.data.demo_heldout, c.data.demo_fresh = 300, 20, 100
    files, heldout = rl.prompt_files(c)
    assert files.endswith("demo_data/fresh.jsonl") and heldout.endswith("heldout.jsonl")
    assert len(open(files).readlines()) == 100
    c.data.train_files = "mine.jsonl"
    assert rl.prompt_files(c)[0] == "mine.jsonl"


def test_rl_without_init_starts_from_the_dpo_run_beside_it(tmp_path):
    c = load("rl", "demo")
    c.workdir = str(tmp_path / "runs" / "demo" / "rl")
    with pytest.raises(ValueError, match="runs/demo/dpo has no checkpoint: `python -m phimr_jax"):
        rl.resolve_init(c)
    c.rl.allow_random_init = True  # asked for explicitly: RL on the random init
    rl.resolve_init(c)
    assert c.init.checkpoint == ""
    dpo = str(tmp_path / "runs" / "demo" / "dpo")
    model = init_model(preset("tiny"), seed=0)
    checkpointing.save_model(dpo, model, step=3,
                             info=checkpointing.run_info(model, stage="dpo", tokenizer_dir=""))
    rl.resolve_init(c)
    assert c.init.checkpoint == dpo


def _rl_cmd(workdir, prompts, *extra):
    return [sys.executable, "-m", "phimr_jax.main", "--config=configs/rl.py:demo",
            f"--config.workdir={workdir}", f"--config.data.train_files={prompts}",
            "--config.data.tokenizer.kind=sentencepiece",
            f"--config.data.tokenizer.path={sp_model()}", "--config.data.demo=false",
            "--config.model.preset=tiny", "--config.data.seq_len=128",
            "--config.rl.max_new_tokens=32", "--config.rl.prompts_per_rollout=8",
            "--config.rl.group_size=8", "--config.rl.rebalance=false",
            "--config.rl.length_filter=false", "--config.data.global_batch_size=32",
            # Every level (the demo preset keeps levels 1-2): these tests check the loop, and
            # the random tiny model's lucky answers give them mixed rewards.
            "--config.rl.max_difficulty=-1",
            "--config.rl.truncated_is_wrong=false",
            "--config.log_every_steps=1", "--config.eval_at_start=false",
            "--config.eval_every_steps=0", "--config.rl.reward_workers=1",
            "--config.rl.allow_random_init=true", *extra]


def _run_rl(workdir, prompts, *extra):
    res = subprocess.run(_rl_cmd(workdir, prompts, *extra), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


DETERMINISTIC = ("loss", "rollout/reward_mean", "rollout/temperature", "rollout/length_mean",
                 "kl", "entropy", "clip_fraction")


@pytest.mark.slow
def test_rl_kill_and_resume_continues_the_same_run(tmp_path):
    prompts = _prompt_file(tmp_path)
    steps = ["--config.total_steps=8", "--config.checkpoint_every_steps=2",
             "--config.rl.updates_per_rollout=2"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _run_rl(straight, prompts, *steps)
    sigkill_after_checkpoint(_rl_cmd(killed, prompts, *steps), killed, 4)
    assert checkpointing.latest_step(killed) < 8
    _run_rl(killed, prompts, *steps)
    a, b = ([r for r in read_metrics(w) if "loss" in r] for w in (straight, killed))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in DETERMINISTIC:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    temps = [r["rollout/temperature"] for r in a]
    # 64 responses per rollout (filters off) = 2 minibatches of 32 x mu 2 = 4 steps per rollout:
    # rollouts at steps 0 and 4 (temperature 1.0, then 0.6 once half the steps are done).
    np.testing.assert_allclose(temps, [st.annealed_temperature(4 * (s // 4), 8)
                                       for s in range(8)], atol=1e-6)
    assert any(r["rollout/reward_mean"] > -1 for r in a)  # mixed rewards: a real signal
    # TensorBoard shows the RL curves, without the steps the killed run logged past its checkpoint.
    for workdir in (straight, killed):
        assert "rollout/temperature" in assert_tensorboard_matches_metrics(workdir)
    assert os.path.exists(os.path.join(straight, rl.CURVES_FILE))


@pytest.mark.slow
def test_ppo_runs_and_later_stages_read_its_policy(tmp_path):
    prompts = _prompt_file(tmp_path)
    workdir = str(tmp_path / "ppo")
    _run_rl(workdir, prompts, "--config.total_steps=2", "--config.rl.algorithm=ppo",
            "--config.rl.updates_per_rollout=1")
    rows = read_metrics(workdir)
    assert "value_loss" in rows[-1] and np.isfinite(rows[-1]["value_loss"])
    model, info, step = checkpointing.restore_model(workdir)
    assert info["param_layout"] == "actor_critic" and step == 2
    assert model.config.num_layers == preset("tiny").num_layers and not hasattr(model, "critic")
