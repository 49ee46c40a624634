"""Stage 3 DPO: the loss against its formula, no gradient into the reference, sequence
log-probs over completion tokens only, and the demo end to end."""

import json
import math
import os
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phimr_jax.data.pairs import pair_rows
from phimr_jax.model import config as mc
from phimr_jax.model.phi3 import init_model
from phimr_jax.stages.dpo import REFERENCE_FILE, dpo_loss, pair_loss, sequence_logps
from phimr_jax.train import checkpointing
from phimr_jax.train.metrics import read_metrics
from tests.data import sp_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reference_formula(pc, pr, rc, rr, beta, eps):
    m = beta * ((pc - rc) - (pr - rr))
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return -(1 - eps) * math.log(sig(m)) - eps * math.log(sig(-m))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1), (0.05, 0.3)])
def test_loss_equals_the_reference_formula(beta, eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 15, size=16) for _ in range(4))
    want = [_reference_formula(*x, beta, eps) for x in zip(pc, pr, rc, rr)]
    # The formula, in float64: 1e-6 absolute.
    with jax.enable_x64(True):
        loss, margin = dpo_loss(*(jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr)),
                                beta, eps)
        np.testing.assert_allclose(np.asarray(loss), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(margin), beta * ((pc - rc) - (pr - rr)), rtol=0,
                                   atol=1e-6)
    # In training precision (float32 log-probs of magnitude ~40): 1e-6 relative.
    loss32, _ = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta, eps)
    np.testing.assert_allclose(np.asarray(loss32, np.float64), want, rtol=1e-6, atol=1e-6)


def test_no_gradient_flows_into_the_reference():
    args = [jnp.array([-3.0, -5.0]), jnp.array([-4.0, -2.0]), jnp.array([-3.5, -4.0]),
            jnp.array([-3.0, -2.5])]
    grads = jax.grad(lambda *a: dpo_loss(*a, 0.1, 0.1)[0].sum(), argnums=(0, 1, 2, 3))(*args)
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


def test_pair_loss_scores_completion_tokens_only():
    from phimr_jax.data.tokenizers import load_tokenizer
    tok = load_tokenizer("sentencepiece", sp_model())
    model = init_model(mc.tiny(initializer_range=0.125), seed=0)
    rec = {"problem": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is \\boxed{5}.",
           "rejected": "2 + 3 = 6. The answer is \\boxed{6}."}
    rows = pair_rows(tok, rec, 128)
    assert rows is not None
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    seq = np.asarray(sequence_logps(model, batch, 16))
    logp = jax.nn.log_softmax(np.asarray(model(rows["inputs"], segment_ids=rows["segment_ids"])))
    for r in range(2):
        mask = rows["loss_mask"][r] > 0
        assert mask.sum() == len(tok.completion_ids(rec["chosen" if r == 0 else "rejected"]))
        want = float(logp[r, np.arange(128), rows["targets"][r]][mask].sum())
        assert seq[r] == pytest.approx(want, abs=1e-3)
    # With the reference equal to the policy the loss is log 2 and the margin 0.
    batch["ref_logp"] = jnp.asarray(seq)
    total, n, sums = pair_loss(model, batch, beta=0.1, label_smoothing=0.0, chunk_size=16)
    assert float(n) == 1 and float(total) == pytest.approx(math.log(2), abs=1e-5)
    assert float(sums["rewards/margin"]) == pytest.approx(0.0, abs=1e-5)
    # RPO: + nll_weight x the chosen side's per-token NLL.
    n_chosen = len(tok.completion_ids(rec["chosen"]))
    total, _, sums = pair_loss(model, batch, beta=0.1, label_smoothing=0.0, chunk_size=16,
                               nll_weight=0.5)
    nll = -float(seq[0]) / n_chosen
    assert float(sums["nll/chosen"]) == pytest.approx(nll, rel=1e-5)
    assert float(total) == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


def test_step_pair_scores_the_step_alone():
    """A pair with a `prefix`: both rows carry prompt + prefix + step, the mask covers the
    step's tokens only (no <|end|>), and the shared prefix adds nothing to the DPO margin."""
    from phimr_jax.data.tokenizers import load_tokenizer
    tok = load_tokenizer("sentencepiece", sp_model())
    model = init_model(mc.tiny(initializer_range=0.125), seed=0)
    rec = {"problem": "What is 12 + 3?", "prefix": "Ones: 2 + 3 =", "chosen": " 5",
           "rejected": " 6"}
    rows = pair_rows(tok, rec, 128)
    prompt, context = tok.prompt_ids(rec["problem"]), tok.encode(rec["prefix"])
    logp = jax.nn.log_softmax(np.asarray(model(rows["inputs"], segment_ids=rows["segment_ids"])))
    seq = np.asarray(sequence_logps(model, {k: jnp.asarray(v) for k, v in rows.items()}, 16))
    for r, side in enumerate(("chosen", "rejected")):
        ids = tok.encode(rec["prefix"] + rec[side])
        assert ids[:len(context)] == context and tok.end_id not in ids
        mask = rows["loss_mask"][r] > 0
        assert np.flatnonzero(mask).tolist() == list(
            range(len(prompt) + len(context) - 1, len(prompt) + len(ids) - 1))
        assert rows["targets"][r][mask].tolist() == ids[len(context):]
        want = float(logp[r, np.arange(128), rows["targets"][r]][mask].sum())
        assert seq[r] == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="does not extend"):
        pair_rows(tok, dict(rec, prefix="The ans", chosen="wer is 5"), 128)


def test_kept_pairs_limit_takes_the_first_pairs_of_every_shard():
    from phimr_jax.data.pairs import kept_pairs
    from phimr_jax.data.tokenizers import load_tokenizer
    tok = load_tokenizer("sentencepiece", sp_model())
    rec = {"problem": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is \\boxed{5}.",
           "rejected": "2 + 3 = 6. The answer is \\boxed{6}."}
    long = dict(rec, chosen="2 + 3 = 5. " * 40)  # does not fit in 128 tokens
    source = [rec, long, rec, rec, rec, rec]
    kept, stats = kept_pairs(source, tok, 128)
    assert kept.tolist() == [0, 2, 3, 4, 5] and stats.num_too_long == 1
    kept, stats = kept_pairs(source, tok, 128, limit=4)
    assert kept.tolist() == [0, 2, 3] and stats.num_pairs == 4
    assert kept_pairs(source, tok, 128, 1, 2, limit=4)[0].tolist() == [3]
    assert kept_pairs(source, tok, 128, limit=100)[0].tolist() == [0, 2, 3, 4, 5]


@pytest.mark.slow
def test_dpo_demo_after_a_short_sft(tmp_path):
    """Stage 1 (short) -> DPO demo: the training-pair margin rises from the reference's 0 and
    preference accuracy exceeds chance; held-out pair metrics are computed (exactly 0 margin
    before training); the reference log-probs are computed once and reused on resume. (At this
    size held-out margins are noise; the full demo's held-out numbers are in the issue note.)"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    small = ["--config.data.demo_train=300", "--config.data.demo_heldout=32",
             "--config.data.eval_problems=8", "--config.data.eval_max_new_tokens=48"]
    s1, s3 = str(tmp_path / "s1"), str(tmp_path / "dpo")

    def run(*args):
        res = subprocess.run([sys.executable, "-m", "phimr_jax.main", *args, *small], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]

    run("--config=configs/midtrain.py:demo", f"--config.workdir={s1}", "--config.total_steps=80",
        "--config.eval_every_steps=0", "--config.data.seq_len=128",
        "--config.data.global_batch_size=8")
    common = ["--config=configs/dpo.py:demo", f"--config.workdir={s3}",
              f"--config.init.checkpoint={s1}", "--config.eval_every_steps=20",
              "--config.eval_at_start=true", "--config.optim.learning_rate=1e-4"]
    run(*common, "--config.total_steps=20")
    ref_file = os.path.join(s3, REFERENCE_FILE)
    stamp = os.path.getmtime(ref_file)
    run(*common, "--config.total_steps=40")  # resumes at 20
    assert os.path.getmtime(ref_file) == stamp
    rows = read_metrics(s3)
    start, end = rows[0], rows[-1]
    trained = [r for r in rows if "loss" in r]
    assert start["eval/pair_margin"] == pytest.approx(0.0, abs=1e-4)
    assert end["step"] == 40 and np.isfinite(end["eval/pair_margin"]) and "eval/accuracy" in end
    assert trained[-1]["rewards/margin"] > max(trained[0]["rewards/margin"], 0.05)
    # The DPO term below chance (log 2); "loss" also holds the demo's RPO NLL term.
    assert trained[-1]["preference_accuracy"] > 0.5 and trained[-1]["dpo_loss"] < math.log(2)
    _, info, _ = checkpointing.restore_model(s3)
    assert info["init"].startswith(f"run {s1}")
    json.dumps(rows)  # metrics are plain JSON


def test_own_pairs_take_the_policys_first_slip_or_its_whole_rollouts(monkeypatch):
    """Pairs from the policy's own rollouts. Step pairs: a completion equal to the solution
    gives nothing; one that departs gives (shared prefix, the solution's number, the
    completion's number) once per distinct slip; an early stop or a wording change gives no
    pair; the pairs are valid rows. Whole pairs: a right vs a wrong rollout of the problem."""
    from phimr_jax.data import demo_corpus
    from phimr_jax.data.tokenizers import load_tokenizer
    from phimr_jax.model.sampling import GenerateResult
    from phimr_jax.stages import dpo
    tok = load_tokenizer("sentencepiece", sp_model())
    rec = demo_corpus.sample_record(random.Random(3), level=2)
    gold = rec["solution"]
    first_num = next(re.finditer(r"= (\d+)", gold))
    slipped = gold[:first_num.start(1)] + str(int(first_num.group(1)) + 1) + \
        gold[first_num.end(1):]
    texts = [gold, slipped, slipped, gold[:20], gold.replace("Ones", "One")]
    calls = []

    def fake_generate(model, prompts, *, num_samples, temperature, **kw):
        calls.append((len(prompts), num_samples, temperature))
        toks = [tok.encode(t) + [tok.stop_ids[0]] for t in texts]
        return GenerateResult(tokens=toks, finish_reasons=["stop"] * len(toks),
                              lengths=[len(t) for t in toks], logprobs=None,
                              sampling_logprobs=None)
    monkeypatch.setattr(dpo, "generate", fake_generate)
    pairs, counts = dpo.own_pairs(None, tok, [rec], steps=True, samples=5, temperature=1.0,
                                  max_new_tokens=160, max_pairs=10, prompts_per_call=8, seed=0)
    assert calls == [(1, 5, 1.0)]
    assert counts == {"rollouts": 5, "correct": 4, "departed": 4, "not_a_number": 2, "pairs": 1}
    (pair,) = pairs
    assert pair["prefix"] == gold[:first_num.start(1) - 1]
    assert pair["chosen"] == " " + first_num.group(1)
    assert pair["rejected"] == " " + str(int(first_num.group(1)) + 1)
    rows = pair_rows(tok, pair, 128)
    assert rows is not None and rows["loss_mask"].sum() >= 2
    # Whole rollout pairs, judged by the boxed answer and not by the text: one per problem, the
    # first right completion vs the first wrong one (the slipped copies still box the gold
    # answer, so the wrong one is the early stop).
    pairs, counts = dpo.own_pairs(None, tok, [rec], steps=False, samples=5, temperature=1.0,
                                  max_new_tokens=160, max_pairs=10, prompts_per_call=8, seed=0)
    (pair,) = pairs
    assert pair["chosen"] == gold and dpo.distill.boxed_answer(pair["rejected"]) != rec["answer"]
    assert set(pair) == {"problem", "chosen", "rejected", "answer", "difficulty", "domain"}


@pytest.mark.parametrize("split", ["train", "fresh"])
def test_own_rollout_pairs_are_made_once_from_the_initial_policy(tmp_path, monkeypatch, split):
    """demo_pairs=own: prepare_reference samples the initial policy on training problems (or,
    own_pairs.problems=fresh, on the RL pool's; here a fake sampler: the right solution, then
    its slipped copy), writes one right-vs-wrong pair per problem into the stage's demo data,
    scores them as the reference, and the DPO batches train on them; a second prepare (a
    resume) samples nothing again."""
    from phimr_jax.data import demo_corpus
    from phimr_jax.data.tokenizers import load_tokenizer
    from phimr_jax.model.sampling import GenerateResult
    from phimr_jax.stages import dpo
    from tests.test_configs import load
    tok = load_tokenizer("sentencepiece", sp_model())
    config = load("dpo", "demo")
    config.workdir = str(tmp_path)
    config.data.update(demo_train=200, demo_heldout=16, demo_fresh=40, seq_len=320,
                       max_pairs=12, global_batch_size=8)
    config.dpo.own_pairs.update(samples=2, prompts_per_call=8, problems=split)
    config.dpo.demo_pairs = "own"
    records = {r["problem"]: r for r in map(json.loads, open(dpo.distill.demo_paths(config)[
        split]))}
    calls = []

    def fake_generate(model, prompts, *, num_samples, **kw):
        calls.append(len(prompts))
        texts = []
        for p in prompts:
            rec = next(r for q, r in records.items() if q in tok.decode(p))
            wrong = demo_corpus.wrong_solution(rec, random.Random(0))["solution"]
            texts += [rec["solution"], wrong][:num_samples]
        toks = [tok.encode(t) + [tok.stop_ids[0]] for t in texts]
        return GenerateResult(tokens=toks, finish_reasons=["stop"] * len(toks),
                              lengths=[len(t) for t in toks], logprobs=None,
                              sampling_logprobs=None)
    monkeypatch.setattr(dpo, "generate", fake_generate)
    model = init_model(mc.tiny(vocab_size=512), seed=0)
    dpo.prepare_reference(model, tok, config, resumed=False)
    # 12 pairs wanted, one per problem, 8 problems per call; on a CPU two calls run at once,
    # so a third may have started beside the second (its rollouts are not used).
    assert calls[:2] == [8, 8] and len(calls) <= 3
    sampled = list(calls)
    train_file, _ = dpo.pair_files(config)
    pairs = [json.loads(line) for line in open(train_file)]
    assert len(pairs) == 12 and os.path.dirname(train_file) == str(tmp_path / "demo_data")
    for pair in pairs:
        rec = records[pair["problem"]]
        assert pair["chosen"] == rec["solution"] and pair["rejected"] != rec["solution"]
        assert pair["answer"] == rec["answer"]
    dataset, stats = dpo.make_data(config, tok)
    assert stats["num_kept"] == 12, stats
    batch = next(iter(dataset))
    assert batch["inputs"].shape == (8, 320) and batch["ref_logp"].shape == (8,)
    os.remove(tmp_path / dpo.REFERENCE_FILE)
    dpo.prepare_reference(model, tok, config, resumed=False)  # the pairs file is reused
    assert calls == sampled
