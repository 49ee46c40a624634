"""Many prompts through the sampler: calls formed in order of prompt length, and on a CPU two
calls at once.

Why two at once: one sampler call leaves much of a 2-core CPU idle (its decode step is a chain
of small kernels, many of them single-threaded), and a second call fills it. Measured on the
demo model (2 CPU cores, calls of 256 rows x 160 steps, `BENCHMARKS.md`, "Session 21"): four
calls took 19.5-21.2 s one after the other and 11.3-12.9 s two at a time (1.64-1.73x;
`configs/bench.py:sampler_calls`: 1.53x), with the same tokens and log-probs to the bit: each
call is the same computation on the same inputs, whatever runs beside it. Two at once only
where that holds and helps: one process (across processes every call's collectives must start
in the same order everywhere) on the CPU backend (an accelerator runs a device's work in order
anyway, and a second call would only hold a second KV cache).
"""

from __future__ import annotations

import collections
import contextvars
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from phimr_jax.model import sampling
from phimr_jax.model.sampling import GenerateResult


def sampler_workers() -> int:
    """How many sampler calls to run at once here: 2 on a single CPU process, else 1."""
    return 2 if jax.process_count() == 1 and jax.default_backend() == "cpu" else 1


def in_order(fn: Callable, items: Iterable, workers: Optional[int] = None) -> Iterator:
    """Yields fn(item) for each item, in the items' order, with up to `workers` calls running
    at once (None = `sampler_workers()`). Lazy: a consumer that stops early leaves at most
    `workers - 1` calls started in vain (they finish before the generator closes). An error
    in a call is raised when its turn comes; the calls not yet started never start."""
    workers = sampler_workers() if workers is None else int(workers)
    items = iter(items)
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    # A worker thread starts without the caller's active mesh (jax.set_mesh) and axis rules
    # (a context variable): each call runs under both, as it would in the caller's thread.
    mesh = jax.sharding.get_mesh()

    def submit(item):
        return pool.submit(contextvars.copy_context().run, _under_mesh, mesh, fn, item)

    with ThreadPoolExecutor(workers, thread_name_prefix="sampler-call") as pool:
        pending = collections.deque(submit(x) for x in itertools.islice(items, workers))
        try:
            while pending:
                yield pending.popleft().result()
                # The consumer wants more: the next call starts (the one after it is running).
                pending.extend(submit(x) for x in itertools.islice(items, 1))
        finally:
            for future in pending:
                future.cancel()


def _under_mesh(mesh, fn: Callable, item):
    if mesh.empty:
        return fn(item)
    with jax.set_mesh(mesh):
        return fn(item)


def generate_in_calls(model, prompts: Sequence[Sequence[int]], *, prompts_per_call: int,
                      seed: int, num_samples: int = 1, on_call=None, workers: Optional[int] = None,
                      **kwargs) -> GenerateResult:
    """`generate` over the prompts in calls of `prompts_per_call` prompts (0 = one call), formed
    in order of prompt length: a call runs until its longest completion, and longer prompts
    tend to have longer completions, so similar prompts finish together and carry less left
    padding (demo held-out set, 256 problems x 4: 676 -> 537 decoding steps). The call
    starting at position `start` of that order samples with `seed + start`, so its rows do not
    depend on how many calls run at once (`workers`, see `in_order`); `on_call(prompts done)`
    runs after each call, in order. Returns one GenerateResult, rows prompt-major in the
    prompts' order. With rope_mode "fixed" pass `fixed_length` so that every call uses one
    regime."""
    n = len(prompts)
    per_call = int(prompts_per_call) or n
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    k, rows = num_samples, [None] * (n * num_samples)
    starts = range(0, n, per_call)

    def call(start):
        return sampling.generate(model, [prompts[i] for i in order[start:start + per_call]],
                                 num_samples=k, seed=seed + start, **kwargs)

    for start, res in zip(starts, in_order(call, starts, workers)):
        for j, i in enumerate(order[start:start + per_call]):
            for s in range(k):
                r = j * k + s
                rows[i * k + s] = (res.tokens[r], res.logprobs[r], res.sampling_logprobs[r],
                                   res.lengths[r], res.finish_reasons[r])
        if on_call is not None:
            on_call(min(start + per_call, n))
    tokens, logprobs, sampling_logprobs, lengths, reasons = (list(c) for c in zip(*rows)) \
        if rows else ([], [], [], [], [])
    return GenerateResult(tokens, logprobs, sampling_logprobs, np.asarray(lengths, np.int64),
                          reasons)
