"""The in-JAX sampler: prefill + one jitted `lax.while_loop` over a preallocated KV cache.

`generate(model, prompts, ...)` samples completions for token-id prompts:
- greedy (`top_k=1` or `temperature=0`), temperature, top-k and top-p. Temperature, top-p and
  top-k are traced values: changing them between calls (an RL annealing schedule) never
  recompiles. Shapes are bucketed (rows to a multiple of 8, prompt length to a multiple of 64,
  generation budget to a power of two >= 64) so a handful of compiled programs serve a run.
- ragged prompts are left-padded: padding has segment id 0 (nothing attends to it) and each
  row's positions start at 0 at its first real token; rows stop independently at a stop token.
- `num_samples` repeats each prompt; rows are prompt-major (p0s0, p0s1, ..., p1s0, ...).
- per generated token: the model's log-prob (temperature 1, no filtering: what a trainer
  computes) and the log-prob under the sampling distribution actually used.
- sharding: under an active mesh the rows are sharded over the batch axes and the weights stay
  sharded by the training rules.

LongRoPE (`rope_mode`):
- "hf" (default, transformers-identical per row): each row follows what HF does for that
  sequence generated on its own, so a row's tokens do not depend on its batch companions or
  its left padding. The prefill picks each row's regime from its own length (long iff its
  prompt alone exceeds original_max_position_embeddings). A row still in the short regime
  whose length (real tokens, not the padded width) is about to exceed it is re-encoded with
  the long factors at that step (HF drops its cache there); only that row's cache and logits
  are replaced. Tokens before a row's crossing were sampled under the short factors, as in HF.
- "fixed": one regime for the whole call, chosen from the maximum total length
  (longest prompt + max_new_tokens), with no re-encode. A trainer scoring the finished
  sequences with `long_rope=rope_regime(config, that length)` gets the same log-probs, which
  RL's importance ratios need.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phimr_jax.model.cache import StepCache
from phimr_jax.model.sharding import (RunsTogether, batch_shards, constrain, current_rules,
                                      gather_to_every_process)

_NEG = -1e30


@dataclasses.dataclass
class GenerateResult:
    """Completions, one row per prompt x sample (prompt-major)."""

    tokens: list  # list[list[int]]: generated ids, up to and including a stop token
    logprobs: list  # list[np.ndarray]: log p_model(token) at temperature 1, per generated token
    sampling_logprobs: list  # list[np.ndarray]: log q(token) under the sampling distribution
    lengths: np.ndarray  # [rows] number of generated tokens
    finish_reasons: list  # "stop" (hit a stop token) or "length" (max_new_tokens reached)


def rope_regime(config, max_total_length: int) -> bool:
    """The fixed LongRoPE regime for sequences of up to `max_total_length` tokens."""
    return config.rope_type == "longrope" and \
        max_total_length > config.original_max_position_embeddings


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _pow2(n: int, lo: int = 64) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def cache_dtype(config):
    """The sampler's KV-cache dtype: the model's compute dtype, except float32 for a 2-byte
    float model on CPU. Why: XLA:CPU has no bfloat16 dynamic-update-slice or bfloat16
    attention matmul of these shapes, so each step's one-slot write became a float32 round
    trip of the whole layer cache (no longer in place) and each read a whole-cache cast: at
    512 rows (the demo's RL rollouts) the cache traffic was about half of a step. The float32
    cache holds exactly the bfloat16 values, so the tokens and log-probs do not change
    (tested). Accelerators keep the compute dtype (half the memory, native writes)."""
    dtype = jnp.dtype(config.jnp_dtype)
    if jax.default_backend() == "cpu" and jnp.issubdtype(dtype, jnp.floating) \
            and dtype.itemsize == 2:
        return jnp.float32
    return dtype


# Top-p / top-k look at this many most likely tokens first (`lax.top_k`), and sort the whole
# vocab only when they do not settle the cutoff. Measured (demo model after stage 1, 256
# held-out completions at T 0.6 and 1.0): 16 candidates always held 0.95 of the mass, 8 did
# not at 0.3-0.5% of positions. On 2 CPU cores a [256, 1024] sort took 37 ms, lax.top_k 32
# 1.9 ms: the sort was 60% of a 256-row eval step (48.6 -> 19.5 ms at top_p 1).
_TOP_CANDIDATES = 32


def _order_key(x):
    """float32 -> int32 with the same order (no NaNs): negative floats' magnitude bits flipped."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF))


def top_p_cutoff(x, top_p):
    """[rows, 1] smallest logit of each row's nucleus (an entry is kept when the mass strictly
    above it is < top_p; ties together), without a sort: the mass above a threshold only falls
    as it rises, so 32 halvings of the logits' float32 order (bit patterns as ordered ints)
    end at `lo`, the highest position whose mass above is >= top_p."""
    probs = jax.nn.softmax(x, axis=-1)
    keys = _order_key(x)

    def mass_above(key):
        return jnp.sum(jnp.where(keys > key, probs, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds  # mass_above(lo) >= top_p > mass_above(hi)
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
        up = mass_above(mid) >= top_p
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # everything above it: all the mass
    hi = jnp.max(keys, axis=-1, keepdims=True)  # nothing above it
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    cut = jnp.min(jnp.where(keys > lo, x, jnp.inf), axis=-1, keepdims=True)
    # top_p <= 0 keeps nothing, as `cutoff` does.
    return jnp.where(mass_above(_order_key(cut)) < top_p, cut, jnp.inf)


def _filter_logits(logits, temperature, top_p, top_k, greedy):
    """Sampling logits: divided by temperature, then top-k and top-p applied (traced values;
    top_k <= 0 and top_p >= 1 disable them). Ties at a cutoff are all kept. `greedy`: the
    caller takes the argmax instead (see below)."""
    scaled = jnp.where(logits > _NEG, logits / jnp.maximum(temperature, 1e-6), _NEG)
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)

    def cutoff(sorted_x, probs):
        """The smallest kept logit, from a descending prefix of the logits and their
        probabilities: an entry is kept while the mass strictly above it is < top_p and it is
        among the first k."""
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = (before < top_p) & (jnp.arange(sorted_x.shape[-1]) < k)
        return jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)

    def sorted_vocab(x):
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        return cutoff(sorted_x, jax.nn.softmax(sorted_x, axis=-1))

    def whole_vocab(x):
        # top-k beyond the candidates needs ranks (a sort: [8, 2048] ~3.5 ms on XLA:CPU);
        # top-p alone only where the mass crosses top_p (`top_p_cutoff`, 32 passes).
        return jax.lax.cond(k < vocab, sorted_vocab, lambda y: top_p_cutoff(y, top_p), x)

    def filtered(x):
        n = min(_TOP_CANDIDATES, vocab)
        top, _ = jax.lax.top_k(x, n)
        probs = jnp.exp(top - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        # The candidates settle a row's cutoff when they hold top_p of its mass (every entry
        # after them has at least that much above it) or when top-k keeps no more than them.
        settled = jnp.all((jnp.sum(probs, axis=-1) >= top_p) | (k <= n))
        cut = jax.lax.cond(settled, lambda: cutoff(top, probs), lambda: whole_vocab(x))
        return jnp.where(x >= cut, x, _NEG)

    # Greedy steps take the argmax and ignore these logits (`_pick`), so they skip the
    # filter: same tokens and log-probs, and on the bench model (vocab 2048, CPU)
    # about 7 -> 4.5 ms per greedy step.
    needs_filter = ((top_p < 1.0) | (top_k > 0)) & ~greedy
    return jax.lax.cond(needs_filter, filtered, lambda x: x, scaled)


def _pick(logits, key, temperature, top_p, top_k, vocab_limit):
    """(token, log p_model, log q_sampling) for one decoding step of every row. Ids at or above
    `vocab_limit` (padded embedding rows no tokenizer produces) are never drawn; the model
    log-prob stays over the full vocab, as a trainer computes it.

    Greedy steps (a traced condition) skip the sampling branch: no random bits, no second
    log-softmax (bench model, 2 CPU cores: ~0.4 ms of a ~3 ms step). Values are those of
    `jax.nn.log_softmax` at the token (same shift, same sum), without writing the full
    [rows, vocab] log-prob array."""
    greedy = (temperature <= 0) | (top_k == 1)
    allowed = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, _NEG)

    def greedy_pick(allowed):
        return _argmax(allowed), jnp.zeros(allowed.shape[:-1], jnp.float32)

    def sample_pick(allowed):
        samp_logits = _filter_logits(allowed, temperature, top_p, top_k, greedy)
        token = _inverse_cdf_draw(key, samp_logits)
        return token, _logprob_at(samp_logits, token)

    token, samp_lp = jax.lax.cond(greedy, greedy_pick, sample_pick, allowed)
    return token, _logprob_at(logits, token), samp_lp


def _inverse_cdf_draw(key, logits):
    """One token per row from softmax(logits): the first index whose cumulative probability
    exceeds a uniform draw in [0, total). One random number per row instead of
    jax.random.categorical's Gumbel noise for every vocab entry: at [512, 1024] on 2 CPU cores
    2.0 ms against 8.5 ms per step (the noise's threefry bits), 13% of an RL rollout step.
    Entries at _NEG have probability 0 and never come first past the draw."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
    token = jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32)
    return jnp.minimum(token, logits.shape[-1] - 1)


def _logprob_at(logits, token):
    """`jax.nn.log_softmax(logits)[row, token[row]]`, computed as log_softmax does."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - lse


def _argmax(x):
    """`jnp.argmax(x, -1)` (first maximum; first NaN if any) as a max and a min reduction:
    XLA:CPU runs argmax's paired (value, index) reduce as a scalar loop, ~0.3 ms per step on
    [8, 2048] logits, against a few microseconds for these two."""
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]),
                   axis=-1)


def _batch_shards(bsz: int) -> int:
    """How many shards the rows are split into under the active mesh (1 without one)."""
    return batch_shards(jax.sharding.get_abstract_mesh(), current_rules(), bsz)


@RunsTogether  # its while_loop holds collectives when rows span processes
@partial(jax.jit, static_argnames=("budget", "hf_rope", "reencode_rows"))
def _sample(model, ids, segment_ids, positions, live, key, temperature, top_p, top_k, stop_ids,
            limit, fixed_long, vocab_limit, *, budget: int, hf_rope: bool, reencode_rows: int):
    bsz, plen = ids.shape
    ids = constrain(ids, ("batch", "length"))
    cache = model.init_cache(bsz, plen + budget, dtype=cache_dtype(model.config))
    # hf: each row's prefill regime from its own length (decode's per-row default).
    logits, cache = model.decode(ids, cache, positions=positions, segment_ids=segment_ids,
                                 long_rope=None if hf_rope else fixed_long, logits_at=plen - 1)
    last_pos = positions[:, -1]
    gen_pos = last_pos[:, None] + 1 + jnp.arange(budget)[None]  # position of each output slot
    # The loop's weights and cache layout (see Phi3ForCausalLM.step_weights / StepCache).
    weights = model.step_weights()
    cache = StepCache.from_cache(cache)

    def step(cache, tok, t, done):
        """Feed the token sampled at step t on top of the cache (rows already done: padding)."""
        return model.decode_step(weights, tok, cache,
                                 positions=jax.lax.dynamic_index_in_dim(gen_pos, t, 1, False),
                                 segment_ids=jnp.where(done, 0, 1).astype(jnp.int32))

    def reencode(cache, logits, crossing, out, t):
        """HF's cache drop at the LongRoPE crossing, for the rows in `crossing` only: each such
        row's prompt + tokens 0..t go through a fresh cache with the long factors, and its
        cache row and logits (those of token t, predicting step t+1) replace what the plain
        step gave it. Rows are re-encoded `reencode_rows` at a time (one per batch shard), so
        a batch whose rows cross at different steps costs about one batch-wide re-encode in
        all, as HF's per-sequence drops do; on steps where no row crosses the loop runs zero
        times. Slot layout, positions and segment ids are the row's own, so the sliding
        window and the padding mask are those of the plain steps; the cache's segment ids
        already hold these values and stay."""
        gen_seg = (jnp.arange(budget)[None] <= t).astype(jnp.int32) * jnp.ones((bsz, 1), jnp.int32)
        seq_ids = jnp.concatenate([ids, out], axis=1)
        seq_pos = jnp.concatenate([positions, gen_pos], axis=1)
        seq_seg = jnp.concatenate([segment_ids, gen_seg], axis=1)

        def one_chunk(carry):
            cache, logits, pending = carry
            # The first `reencode_rows` pending rows; index bsz pads the chunk: its gather
            # clips to a real row (wasted work) and its scatters are dropped.
            rows = jnp.nonzero(pending, size=reencode_rows, fill_value=bsz)[0]
            take = lambda x: jnp.take(x, rows, axis=0, mode="clip")
            fresh = model.init_cache(reencode_rows, plen + budget,
                                     dtype=cache_dtype(model.config))
            row_logits, fresh = model.decode(take(seq_ids), fresh, positions=take(seq_pos),
                                             segment_ids=take(seq_seg), long_rope=True,
                                             logits_at=plen + t)
            cache = cache.set_rows(rows, fresh).replace(
                long_rope=cache.long_rope.at[rows].set(True, mode="drop"))
            logits = logits.at[rows].set(row_logits[:, 0], mode="drop")
            return cache, logits, pending.at[rows].set(False, mode="drop")

        cache, logits, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), one_chunk,
                                              (cache, logits, crossing))
        return cache, logits

    def cond(state):
        t, _, _, done, *_ = state
        return (t < limit) & ~jnp.all(done)

    def body(state):
        t, logits, cache, done, out, lp, slp = state
        tok, model_lp, samp_lp = _pick(logits, jax.random.fold_in(key, t), temperature, top_p,
                                       top_k, vocab_limit)
        tok = jnp.where(done, 0, tok)
        out = out.at[:, t].set(tok)
        lp = lp.at[:, t].set(jnp.where(done, 0.0, model_lp))
        slp = slp.at[:, t].set(jnp.where(done, 0.0, samp_lp))
        logits, cache = step(cache, tok, t, done)
        done_next = done | jnp.isin(tok, stop_ids)
        if hf_rope:
            # Each row's own length once token t is fed: its real tokens, whatever its padding.
            length = jax.lax.dynamic_index_in_dim(gen_pos, t, axis=1, keepdims=False) + 1
            # A row that just stopped needs no next-step logits, so it is not re-encoded.
            crossing = model.needs_reencode(cache, length) & ~done_next
            # Skipped as a whole on the (most) steps where no row crosses.
            cache, logits = jax.lax.cond(jnp.any(crossing), reencode,
                                         lambda cache, logits, *_: (cache, logits),
                                         cache, logits, crossing, out, t)
        return t + 1, logits, cache, done_next, out, lp, slp

    zeros = jnp.zeros((bsz, budget), jnp.float32)
    # Filler rows (bucket padding) start done: they never keep the loop going or re-encode.
    init = (jnp.int32(0), logits[:, 0], cache, ~live,
            jnp.zeros((bsz, budget), jnp.int32), zeros, zeros)
    _, _, _, _, out, lp, slp = jax.lax.while_loop(cond, body, init)
    return out, lp, slp


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             seed: int = 0, stop_tokens: Optional[Sequence[int]] = None, rope_mode: str = "hf",
             pad_id: int = 0, vocab_limit: Optional[int] = None,
             fixed_length: Optional[int] = None) -> GenerateResult:
    """Sample `num_samples` completions of each prompt (token-id lists); see module docstring.

    stop_tokens: None = the model's stop tokens (<|end|>, <|endoftext|>); [] = never stop early.
    vocab_limit: never draw ids >= this (pass the tokenizer's size when the model's embedding
    is padded beyond it, as Phi-4-mini's is); None = the whole vocab.
    fixed_length: rope_mode "fixed" picks its regime from this total length instead of this
    call's longest prompt + max_new_tokens (one regime over several calls).
    """
    if rope_mode not in ("hf", "fixed"):
        raise ValueError(f"rope_mode must be 'hf' or 'fixed', got {rope_mode!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    stops = list(cfg.stop_token_ids if stop_tokens is None else stop_tokens)
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    n = len(rows)
    bsz, plen, budget = _round_up(n, 8), _round_up(max(len(r) for r in rows), 64), \
        _pow2(max_new_tokens)
    ids = np.full((bsz, plen), pad_id, np.int32)
    seg = np.zeros((bsz, plen), np.int32)
    pos = np.zeros((bsz, plen), np.int32)
    for i, r in enumerate(rows):
        ids[i, plen - len(r):], seg[i, plen - len(r):] = r, 1
        pos[i, plen - len(r):] = np.arange(len(r))
    for i in range(n, bsz):  # filler rows: one dummy token so every row has a position
        seg[i, -1] = 1
    longest = max(len(r) for r in rows)
    out, lp, slp = _sample(
        model, ids, seg, pos, np.arange(bsz) < n, jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(top_k), jnp.asarray(stops or [-1], jnp.int32),
        jnp.int32(max_new_tokens),
        jnp.asarray(rope_regime(cfg, fixed_length or longest + max_new_tokens)),
        jnp.int32(vocab_limit or cfg.vocab_size), budget=budget, hf_rope=rope_mode == "hf",
        reencode_rows=_batch_shards(bsz))
    if jax.process_count() > 1:  # rows are sharded over hosts: every process gets them all
        out, lp, slp = gather_to_every_process((out, lp, slp))
    out, lp, slp = np.asarray(out)[:n], np.asarray(lp)[:n], np.asarray(slp)[:n]
    tokens, lps, slps, lengths, reasons = [], [], [], [], []
    for i in range(n):
        row = out[i, :max_new_tokens].tolist()
        hit = [j for j, tok in enumerate(row) if tok in stops]
        length = hit[0] + 1 if hit else max_new_tokens
        tokens.append(row[:length])
        lps.append(lp[i, :length])
        slps.append(slp[i, :length])
        lengths.append(length)
        reasons.append("stop" if hit else "length")
    return GenerateResult(tokens, lps, slps, np.asarray(lengths), reasons)
