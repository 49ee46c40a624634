"""Stage `bench`: benchmarks that print figures (never timed unit tests).

`sampler`: tokens/s of `phimr_jax.generate` against `transformers` `generate` on the same small
Phi3 model (same weights, batch, prompt and generation lengths), in one process, as a ratio.
Both greedy, neither stops early; our sampler is measured after its one compilation, HF after a
warm-up call. Requires torch (the `test` extra). In both comparisons with HF, torch runs at
each thread count of `hf_threads` and its best is the baseline (on a loaded 2-core machine one
torch thread was 2-3x faster than two).

`forward`: tokens/s of our jitted full forward (float32 [batch, seq, vocab] logits) against the
`transformers` torch forward of the same weights and token ids, in one process, as a ratio;
ours once per attention implementation in `attention_impls`. The max |logit difference| is
reported too, so a fast wrong forward cannot pass unnoticed.

`train_step`: one jitted optimizer step like the trainer's (value_and_grad of the chunked
cross-entropy, global-norm clipping, AdamW, donated state): tokens/s, model TFLOP/s, MFU
against a measured ceiling (the best time of one jitted [n, n] @ [n, n] matmul in the compute
dtype), compile time, and memory: XLA's buffer assignment (argument + output + temp - aliased,
`compiled.memory_analysis()`) next to `train.memory.estimate`. Model FLOPs per step are
6 x (matmul parameters, the tied LM head included) x tokens + causal attention,
3 (fwd + bwd) x 2 matmuls x 2 x batch x heads x head_dim x T(T+1)/2 x layers: recomputation
(remat, the rematerialised loss chunks) and masked-out blocks are not counted.
It also times the forward + backward pass alone (`fwd_bwd_s`) against `summed_matmul_s`, the
sum of every matmul of that pass timed alone with the same shapes and dtype (`matmul_shapes`):
their ratio is what the non-matmul work (norms, softmax, masks, layout copies) costs on top.
`train_step_demo` runs it on the demo recipe's stage-1 step.

`sampler_calls`: the demo's sampler calls one at a time against two at once
(`tools/bench_calls.py`).

`all`: sampler, forward and train_step in turn, one JSON each plus bench_all.json.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from phimr_jax.model.config import preset
from phimr_jax.model.dtypes import resolve_compute_dtype
from phimr_jax.model.hf_io import load_hf, save_hf
from phimr_jax.model.phi3 import init_model, param_count
from phimr_jax.model.sampling import generate

log = logging.getLogger(__name__)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _threads(spec) -> list[int]:
    """torch thread counts to try for the HF side ("1,2"; 0 = all cores)."""
    return [int(x) or (os.cpu_count() or 1) for x in str(spec).split(",") if x.strip()]


def _hf_best(fn, threads: list[int], repeats: int, out: dict, tokens: int) -> float:
    """Best time of `fn` over torch thread counts (each tried `repeats` times after a warm-up);
    records tokens/s per thread count in `out`. On a loaded 2-core machine one torch thread
    can beat two by 2-3x (OpenMP barriers stall when a core is taken), so HF gets its best."""
    import torch

    best = float("inf")
    for n in threads:
        torch.set_num_threads(n)
        fn()
        t = _time(fn, repeats)
        out[f"hf_tokens_per_s_{n}_threads"] = tokens / t
        best = min(best, t)
    torch.set_num_threads(os.cpu_count() or 1)
    return best


def bench_sampler(config: ConfigDict) -> dict:
    import torch

    b = config.sampler
    cfg, model, hf = _ours_and_hf(b, dtype=resolve_compute_dtype(b.get("dtype", "float32")))
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, size=(b.batch_size, b.prompt_len)).tolist()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor(prompts)

    temperature, top_p = float(b.get("temperature", 0.0)), float(b.get("top_p", 1.0))
    sampled = dict(temperature=temperature, top_p=top_p) if temperature > 0 else dict(top_k=1)

    def ours():
        generate(model, prompts, max_new_tokens=b.new_tokens, stop_tokens=[], **sampled)

    def theirs():
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=b.new_tokens, min_new_tokens=b.new_tokens,
                        **(dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                           if temperature > 0 else dict(do_sample=False)))

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    tokens = b.batch_size * b.new_tokens
    t_ours = _time(ours, b.repeats)
    out = {"bench": "sampler", "device": jax.devices()[0].device_kind,
           "model": b.model_preset, "params": param_count(cfg),
           "batch": b.batch_size, "prompt_len": b.prompt_len, "new_tokens": b.new_tokens,
           "dtype": model.config.dtype, "temperature": temperature, "top_p": top_p}
    t_hf = _hf_best(theirs, _threads(b.hf_threads), b.repeats, out, tokens)
    out.update({"ours_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_hf,
                "ratio": t_hf / t_ours, "ours_first_call_s": compile_s,
                "hf_ms_per_step": 1000 * t_hf / b.new_tokens})
    return out


def _ours_and_hf(b: ConfigDict, **model_kw):
    """Our model and the transformers model with the same weights (via save_hf/load_hf)."""
    import torch
    import transformers

    cfg = preset(b.model_preset, **dict(b.model_overrides), **model_kw)
    model = init_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        model = load_hf(tmp, compute_dtype=cfg.dtype)  # float32 weights, cfg's compute dtype
    torch.set_num_threads(os.cpu_count() or 1)
    return cfg, model, hf


def bench_forward(config: ConfigDict) -> dict:
    import torch

    b = config.forward
    cfg, loaded, hf = _ours_and_hf(b)
    ids = np.random.default_rng(0).integers(4, cfg.vocab_size, size=(b.batch_size, b.seq_len))
    tokens = b.batch_size * b.seq_len
    ids_t = torch.tensor(ids)

    def theirs():
        with torch.no_grad():
            return hf(ids_t).logits

    hf_logits = theirs().numpy()  # also the warm-up
    out = {"bench": "forward", "device": jax.devices()[0].device_kind, "model": b.model_preset,
           "params": param_count(cfg), "batch": b.batch_size, "seq_len": b.seq_len,
           "attention_block_size": b.attention_block_size}
    ids_j = jnp.asarray(ids, jnp.int32)
    ours = {}
    for impl in [s.strip() for s in str(b.attention_impls).split(",") if s.strip()]:
        graphdef, state = nnx.split(_with_impl(loaded, impl, b.attention_block_size))
        fwd = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x))
        start = time.perf_counter()
        logits = np.asarray(jax.block_until_ready(fwd(state, ids_j)))
        out[f"{impl}_first_call_s"] = time.perf_counter() - start
        out[f"{impl}_max_abs_logit_diff"] = float(np.abs(logits - hf_logits).max())
        ours[impl] = lambda f=fwd, st=state: jax.block_until_ready(f(st, ids_j))
    # Interleaved repeats (HF at each thread count, then ours), best of each: load on a shared
    # machine drifts, and interleaving gives every side the same conditions. HF gets its best
    # thread count (see _hf_best).
    threads = _threads(b.hf_threads)
    sides = [(f"hf{n}", theirs, n) for n in threads] + [(i, f, None) for i, f in ours.items()]
    best = {name: float("inf") for name, _, _ in sides}
    for _ in range(b.repeats):
        for name, fn, n in sides:
            if n is not None:
                torch.set_num_threads(n)
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    for n in threads:
        out[f"hf_tokens_per_s_{n}_threads"] = tokens / best[f"hf{n}"]
    t_hf = min(best[f"hf{n}"] for n in threads)
    out["hf_tokens_per_s"] = tokens / t_hf
    for impl in ours:
        out[f"{impl}_tokens_per_s"] = tokens / best[impl]
        out[f"{impl}_ratio_vs_hf"] = t_hf / best[impl]
    return out


def _with_impl(model, impl: str, block_size: int):
    """The same weights under another attention implementation (the config is static)."""
    _, state = nnx.split(model)
    cfg = model.config.replace(attention_impl=impl, attention_block_size=block_size)
    fresh = nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0)))
    new_graphdef, _ = nnx.split(fresh)
    return nnx.merge(new_graphdef, state)


def matmul_ceiling(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted [n, n] @ [n, n] matmuls with inputs in `dtype`
    and float32 accumulation, as the model's projections run (a bfloat16-output matmul takes
    a slower path on CPU: 5-7x slower than float32 accumulation on an AMX Xeon)."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, a))
    return 2 * n ** 3 / _time(lambda: jax.block_until_ready(mm(a, a)), repeats)


def model_flops_per_token_pair(cfg) -> tuple[int, int]:
    """(matmul parameters: layers without norms + the LM head, attention FLOPs per visible
    (query, key) pair per layer in fwd + bwd: 3 x 2 matmuls x 2 x heads x head_dim)."""
    from phimr_jax.model.layer_stack import layer_param_shapes

    per_layer = sum(int(np.prod(s)) for n, s in layer_param_shapes(cfg).items()
                    if not n.endswith("norm"))
    n_matmul = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    return n_matmul, 12 * cfg.num_heads * cfg.resolved_head_dim


def matmul_shapes(cfg, batch: int, seq: int) -> list[tuple]:
    """Every matmul of one forward + backward pass of the model, as (batch dims, m, k, n):
    each projection's forward and its two gradient matmuls, the LM head's three, and the
    attention's score and value matmuls (2 forward, 4 backward) per layer, unmasked."""
    tokens = batch * seq
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    h, kv = cfg.num_heads, cfg.num_kv_heads
    projections = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, f), (d, f), (f, d)]
    shapes = []
    for k, n in projections * cfg.num_layers + [(d, cfg.vocab_size)]:
        shapes += [((), tokens, k, n), ((), tokens, n, k), ((), k, tokens, n)]
    rows = (batch * kv, h // kv * seq)  # GQA: the query heads of one KV head share its keys
    shapes += [(rows[:1], rows[1], hd, seq), (rows[:1], rows[1], seq, hd)] * 3 * cfg.num_layers
    return shapes


def summed_matmul_s(cfg, batch: int, seq: int, dtype: str, repeats: int = 5) -> float:
    """Seconds of the matmuls of one forward + backward pass, each timed alone (jitted, best of
    `repeats`) in the compute dtype with float32 accumulation, as the model runs them."""
    dt = jnp.dtype(dtype)
    timed, total = {}, 0.0
    for bdims, m, k, n in matmul_shapes(cfg, batch, seq):
        key = (bdims, m, k, n)
        if key not in timed:
            a = jnp.ones(bdims + (m, k), dt)
            b = jnp.ones(bdims + (k, n), dt)
            mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
            jax.block_until_ready(mm(a, b))
            timed[key] = _time(lambda: jax.block_until_ready(mm(a, b)), repeats)
        total += timed[key]
    return total


def compile_step(step, *args) -> tuple:
    """(compiled step with its first two arguments donated, compile seconds, XLA's peak bytes:
    argument + output + temp - aliased, from the compiled buffer assignment)."""
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    return compiled, compile_s, peak


def timed_steps(compiled, params, opt_state, batch, steps: int) -> tuple:
    """Run a compiled (params, opt_state, batch) -> (params, opt_state, value) step `steps`
    times on its own outputs: (params, opt_state, last value, seconds of each step)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, opt_state, value = compiled(params, opt_state, batch)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    return params, opt_state, value, times


def bench_train_step(config: ConfigDict) -> dict:
    import optax

    from phimr_jax.train import losses, memory

    b = config.train_step
    cfg = preset(b.model_preset, **dict(b.model_overrides), attention_impl=b.attention_impl,
                 attention_block_size=b.attention_block_size, remat_policy=b.remat_policy,
                 dtype=resolve_compute_dtype(b.dtype),
                 scan_layers=bool(b.get("scan_layers", True)))
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95))
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.vocab_size, size=(b.batch_size, b.seq_len + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "loss_mask": jnp.ones((b.batch_size, b.seq_len), jnp.float32)}

    def step(params, opt_state, batch):
        def loss_fn(p):
            total, weight, _ = losses.cross_entropy(nnx.merge(graphdef, p), batch, b.chunk_size)
            return total / weight
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def fwd_bwd(params, batch):
        return jax.value_and_grad(lambda p: losses.cross_entropy(
            nnx.merge(graphdef, p), batch, b.chunk_size)[0])(params)

    fwd_bwd = jax.jit(fwd_bwd)
    jax.block_until_ready(fwd_bwd(params, batch))
    fwd_bwd_s = _time(lambda: jax.block_until_ready(fwd_bwd(params, batch)), b.steps)
    matmul_s = summed_matmul_s(cfg, b.batch_size, b.seq_len, cfg.dtype)

    compiled, compile_s, peak = compile_step(step, params, opt_state, batch)
    est = memory.estimate(cfg, seq_len=b.seq_len, batch_per_device=b.batch_size,
                          chunk_size=b.chunk_size)
    params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
    params, opt_state, loss, times = timed_steps(compiled, params, opt_state, batch, b.steps)
    t = float(np.median(times))
    tokens = b.batch_size * b.seq_len
    n_matmul, per_pair = model_flops_per_token_pair(cfg)
    pairs = b.batch_size * b.seq_len * (b.seq_len + 1) // 2
    flops = 6 * n_matmul * tokens + per_pair * pairs * cfg.num_layers
    ceiling = matmul_ceiling(cfg.dtype, b.matmul_size)
    return {"bench": "train_step", "device": jax.devices()[0].device_kind,
            "model": b.model_preset, "params": param_count(cfg), "matmul_params": n_matmul,
            "batch": b.batch_size, "seq_len": b.seq_len, "attention_impl": cfg.attention_impl,
            "attention_block_size": cfg.attention_block_size,
            "remat_policy": cfg.remat_policy, "scan_layers": cfg.scan_layers, "dtype": cfg.dtype,
            "chunk_size": b.chunk_size, "step_s": t, "tokens_per_s": tokens / t,
            "model_tflops_per_step": flops / 1e12,
            "model_tflop_per_s": flops / t / 1e12, "matmul_ceiling_tflop_per_s": ceiling / 1e12,
            "mfu": flops / t / ceiling, "compile_s": compile_s,
            "fwd_bwd_s": fwd_bwd_s, "summed_matmul_s": matmul_s,
            "fwd_bwd_over_matmuls": fwd_bwd_s / matmul_s,
            "peak_memory_mib": peak / 2**20, "estimated_memory_mib": est["total"] / 2**20,
            "loss": float(loss)}


def bench_all(config: ConfigDict) -> dict:
    results = {}
    for name in ("sampler", "forward", "train_step"):
        results[name] = BENCHES[name](config)
        _report(name, results[name], config.workdir)
    return results


def bench_sampler_calls(config: ConfigDict) -> dict:
    from phimr_jax.tools.bench_calls import bench_sampler_calls as bench
    return bench(config)


BENCHES = {"sampler": bench_sampler, "forward": bench_forward, "train_step": bench_train_step,
           "sampler_calls": bench_sampler_calls, "all": bench_all}


def _report(name: str, result: dict, workdir: str) -> None:
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                    for k, v in result.items()), flush=True)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, f"bench_{name}.json"), "w") as f:
            json.dump(result, f, indent=2)


def run(config: ConfigDict) -> dict:
    if config.bench not in BENCHES:
        raise ValueError(f"unknown bench {config.bench!r}; choose from {sorted(BENCHES)}")
    result = BENCHES[config.bench](config)
    if config.bench == "all":
        if config.workdir:
            with open(os.path.join(config.workdir, "bench_all.json"), "w") as f:
                json.dump(result, f, indent=2)
    else:
        _report(config.bench, result, config.workdir)
    return result
