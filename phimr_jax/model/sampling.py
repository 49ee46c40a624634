"""Greedy decoding on the KV cache, one jitted prefill + `lax.while_loop`.

Used by the training stages' held-out evaluation. Prompts are left-padded to a bucketed length
(segment 0 marks padding, positions count from each prompt's first real token), so a few
compiled shapes serve a whole run. Simplification (documented, extended by the sampler issue):
the LongRoPE regime is fixed once from prompt length + max_new_tokens, the same rule the
trainer's forward pass applies to a sequence of that length.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _bucket(n: int, size: int = 64) -> int:
    return max(size, -(-n // size) * size)


@partial(jax.jit, static_argnames=("max_new_tokens",))
def _greedy(model, ids, segment_ids, positions, stop_ids, long_rope, max_new_tokens: int):
    bsz, plen = ids.shape
    cache = model.init_cache(bsz, plen + max_new_tokens)
    logits, cache = model.decode(ids, cache, positions=positions, segment_ids=segment_ids,
                                 long_rope=long_rope)
    next_tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    next_pos = positions[:, -1] + 1
    out = jnp.zeros((bsz, max_new_tokens), jnp.int32)

    def cond(state):
        t, _, _, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, pos, cache, done, out = state
        out = out.at[:, t].set(jnp.where(done, 0, tok))
        done = done | jnp.isin(tok, stop_ids)
        logits, cache = model.decode(tok[:, None], cache, positions=pos[:, None])
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return t + 1, nxt, pos + 1, cache, done, out

    init = (jnp.int32(0), next_tok, next_pos, cache, jnp.zeros((bsz,), bool), out)
    *_, out = jax.lax.while_loop(cond, body, init)
    return out


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int], pad_id: int = 0) -> list:
    """Greedy completions (token lists, ending at and including a stop token if one came)."""
    plen = _bucket(max(len(p) for p in prompts))
    bsz = len(prompts)
    ids = np.full((bsz, plen), pad_id, np.int32)
    seg = np.zeros((bsz, plen), np.int32)
    pos = np.zeros((bsz, plen), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, plen - n:], seg[i, plen - n:], pos[i, plen - n:] = p, 1, np.arange(n)
    cfg = model.config
    long_rope = cfg.rope_type == "longrope" and \
        max(len(p) for p in prompts) + max_new_tokens > cfg.original_max_position_embeddings
    out = np.asarray(_greedy(model, ids, seg, pos, jnp.asarray(list(stop_ids), jnp.int32),
                             jnp.asarray(long_rope), max_new_tokens))
    results = []
    for row in out:
        toks = []
        for t in row.tolist():
            toks.append(t)
            if t in stop_ids:
                break
        results.append(toks)
    return results
