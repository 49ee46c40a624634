"""Stage `bench_device`: the GPU path proven in one command (`configs/bench.py:device`).

Sections, in order, each timed and guarded (an exception is recorded as the section's `error`
and the next section still runs; a section that would start after `time_budget_s` is skipped):

- correctness (`device_checks.section_correctness`): logits of a small random Phi3 against
  transformers in float32 and bfloat16, greedy `generate` tokens against HF `generate`, and
  blockwise / cuDNN attention against the XLA reference in value and gradient, with the
  fallback that really ran recorded as `resolved` (the details are in `device_checks`).
- ceilings: the best of `repeats` jitted bf16 [n, n] @ [n, n] matmuls (bench.matmul_ceiling),
  and HBM bandwidth: a streamed read (sum) and a read + write (scale) of one large array.
- train_step: `bench.bench_train_step` (value_and_grad of the chunked loss, clipping, AdamW,
  donated state) at Phi-4-mini shape: tokens/s, model TFLOP/s, MFU against its own matmul
  ceiling, XLA's memory next to `memory.estimate`. If cuDNN fails, the error is kept and the
  step is rerun with `train_step_fallback_impl`; `train_step_layers` trades depth for time.
- decode: one jitted loop of `steps` single-token `model.decode` steps + argmax per batch size,
  from a cache with `context` filled slots, bf16 weights created on the device. The floor is
  (parameter bytes + KV-cache bytes) / the measured bandwidth; the KV bytes are the whole
  allocated cache (context + steps slots), which the single-token step reads. Then one
  `generate` program across a temperature schedule (the compile count is read from the jit).
- rl_memory: one GRPO train step (`rl.grpo_batch_loss`, the RL stage's loss) on one row of
  `seq_len` tokens: XLA's buffer assignment and the allocator's peak (where the backend reports
  it, and only if this step raised it) against `memory.estimate`.

Output: a table on stdout and `workdir/bench_device.json` (`checks`: every pass/fail, kind
"correctness" or "target"; `sections`: every figure), rewritten after every section so that a
run killed at its time limit still leaves what it measured. Figures of a section that fails
part-way are kept next to its error.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from phimr_jax.model import attention as attn_lib
from phimr_jax.model.config import preset
from phimr_jax.model.phi3 import init_model, param_count
from phimr_jax.tools import bench
# section_correctness is used by name: run() looks sections up in globals().
from phimr_jax.tools.device_checks import _check, _part, section_correctness  # noqa: F401

log = logging.getLogger(__name__)


def _best(fn, repeats: int) -> float:
    """Best wall time of `fn()` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------------ ceilings
def hbm_bandwidth(mib: int, repeats: int) -> dict:
    """Bytes/s of a streamed read (sum of an f32 array) and of a read + write (scale by 2)."""
    x = jax.random.normal(jax.random.key(0), (mib * 2**20 // 4,), jnp.float32)
    read = jax.jit(jnp.sum)
    scale = jax.jit(lambda a: a * 2.0)
    jax.block_until_ready(read(x))
    jax.block_until_ready(scale(x))
    t_read = _best(lambda: jax.block_until_ready(read(x)), repeats)
    t_copy = _best(lambda: jax.block_until_ready(scale(x)), repeats)
    return {"read": x.nbytes / t_read, "read_write": 2 * x.nbytes / t_copy}


def section_ceilings(d: ConfigDict, checks: list, out: dict) -> None:
    c = d.ceilings
    flops = bench.matmul_ceiling(c.matmul_dtype, c.matmul_size, c.repeats)
    out.update(matmul_size=c.matmul_size, matmul_dtype=c.matmul_dtype,
               matmul_ceiling_tflop_per_s=flops / 1e12, bandwidth_mib=c.bandwidth_mib)
    bw = hbm_bandwidth(c.bandwidth_mib, c.repeats)
    out.update(hbm_read_gb_per_s=bw["read"] / 1e9, hbm_read_write_gb_per_s=bw["read_write"] / 1e9,
               # The floor uses the faster probe: the stricter (lower) floor.
               hbm_gb_per_s=max(bw.values()) / 1e9)


# ------------------------------------------------------------------------ train step
def section_train_step(d: ConfigDict, checks: list, out: dict) -> None:
    b = ConfigDict(d.train_step.to_dict())
    full = preset(b.model_preset, **dict(b.model_overrides))
    if d.train_step_layers:
        b.model_overrides = ConfigDict({**b.model_overrides.to_dict(),
                                        "num_layers": int(d.train_step_layers)})
    try:
        result = bench.bench_train_step(ConfigDict({"train_step": b}))
    except Exception as e:
        fallback = d.train_step_fallback_impl
        if not fallback or fallback == b.attention_impl:
            raise
        # A figure from the other kernel beats none; the error says why it is not cuDNN's.
        log.error("train step with %s failed, retrying with %s:\n%s", b.attention_impl,
                  fallback, traceback.format_exc())
        out[f"{b.attention_impl}_error"] = f"{type(e).__name__}: {e}"[:2000]
        gc.collect()
        b.attention_impl = fallback
        result = bench.bench_train_step(ConfigDict({"train_step": b}))
    out.update(result)
    out["num_layers"] = preset(b.model_preset, **dict(b.model_overrides)).num_layers
    if out["num_layers"] != full.num_layers:  # the full model's FLOPs per token, same rate
        n_matmul, per_pair = bench.model_flops_per_token_pair(full)
        t = b.seq_len
        per_token = 6 * n_matmul + per_pair * (t + 1) / 2 * full.num_layers
        out["full_num_layers"] = full.num_layers
        out["tokens_per_s_scaled_to_full_depth"] = out["model_tflop_per_s"] * 1e12 / per_token
    out["resolved_attention"] = attn_lib.resolve_impl(b.attention_impl, segmented=False,
                                                      dtype=b.dtype)
    _check(checks, f"train step model TFLOP/s ({out['resolved_attention']})",
           out["model_tflop_per_s"], d.train_step_target_tflop_per_s, "target",
           higher_is_better=True)


# ------------------------------------------------------------------------ decode
def _decode_loop(graphdef, steps: int):
    @functools.partial(jax.jit, donate_argnums=(1,))
    def loop(state, cache, tok):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, tok = carry
            logits, cache = model.decode(tok[:, None], cache)
            return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tok))
    return loop


def _temperature_schedule(c: ConfigDict, model, checks: list, out: dict) -> None:
    from phimr_jax.model import sampling

    temps = [float(x) for x in c.schedule_temperatures.split(",")]
    prompts = np.random.default_rng(4).integers(
        4, model.config.vocab_size, size=(c.schedule_batch, c.schedule_prompt_len)).tolist()
    before = sampling._sample._cache_size()
    times = []
    for temp in temps:
        start = time.perf_counter()
        res = sampling.generate(model, prompts, max_new_tokens=c.schedule_new_tokens,
                                temperature=temp, top_p=c.schedule_top_p, stop_tokens=[],
                                seed=1)
        times.append(time.perf_counter() - start)
        assert all(len(t) == c.schedule_new_tokens for t in res.tokens)
    compiles = sampling._sample._cache_size() - before
    out["schedule_temperatures"] = temps
    out["schedule_call_s"] = times
    out["schedule_compiles"] = compiles
    _check(checks, "generate compiles across the temperature schedule", compiles, 1,
           "correctness")


def section_decode(d: ConfigDict, checks: list, out: dict,
                   bandwidth: float | None = None) -> None:
    c = d.decode
    cfg = preset(c.model_preset, **dict(c.model_overrides), param_dtype="bfloat16",
                 dtype="bfloat16")
    model = init_model(cfg, seed=0)  # created on the device by one jitted init, in bf16
    graphdef, state = nnx.split(model)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out.update(model=c.model_preset, params=param_count(cfg), param_bytes=param_bytes,
               context=c.context, steps=c.steps)
    if bandwidth is None:  # the ceilings section did not run: measure here
        bandwidth = max(hbm_bandwidth(d.ceilings.bandwidth_mib, d.ceilings.repeats).values())
    out["hbm_gb_per_s_used"] = bandwidth / 1e9
    loop = _decode_loop(graphdef, c.steps)

    def one_batch(b):
        cache = model.init_cache(b, c.context + c.steps)
        cache = cache.replace(index=jnp.int32(c.context),
                              segment_ids=cache.segment_ids.at[:, :c.context].set(1))
        kv_bytes = cache.k.nbytes + cache.v.nbytes
        tok = jnp.full((b,), 5, jnp.int32)
        holder = {"cache": cache}

        def once():
            new_cache, last = loop(state, holder["cache"], tok)
            jax.block_until_ready(last)
            holder["cache"] = new_cache.replace(index=jnp.int32(c.context))

        start = time.perf_counter()
        once()
        compile_s = time.perf_counter() - start
        step_ms = 1000 * _best(once, c.repeats) / c.steps
        floor_ms = 1000 * (param_bytes + kv_bytes) / bandwidth
        out[f"batch{b}"] = {"ms_per_step": step_ms, "floor_ms": floor_ms,
                            "ratio_to_floor": step_ms / floor_ms, "kv_bytes": kv_bytes,
                            "tokens_per_s": b * 1000 / step_ms, "first_call_s": compile_s}
        _check(checks, f"decode batch {b} ms/step / HBM floor", step_ms / floor_ms,
               c.target_floor_ratio, "target")

    for b in [int(x) for x in str(c.batch_sizes).split(",") if x.strip()]:
        _part(checks, out, f"decode_batch{b}", one_batch, b)
        gc.collect()
    _part(checks, out, "temperature_schedule", _temperature_schedule, c, model, checks, out)


# ------------------------------------------------------------------------ RL memory
def section_rl_memory(d: ConfigDict, checks: list, out: dict) -> None:
    import optax

    from phimr_jax.stages.rl.stage import grpo_batch_loss
    from phimr_jax.train import memory

    c = d.rl_memory
    cfg = preset(c.model_preset, **dict(c.model_overrides), attention_impl=c.attention_impl,
                 attention_block_size=c.attention_block_size, remat_policy=c.remat_policy,
                 dtype=c.dtype)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak_before = stats.get("peak_bytes_in_use")
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    del model
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-7, b1=0.9, b2=0.95))
    opt_state = jax.jit(tx.init)(params)
    b, t = c.batch_size, c.seq_len
    rng = np.random.default_rng(5)
    ids = rng.integers(4, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, c.prompt_len - 1:] = 1.0  # completion tokens (as stages/rl/rollouts marks them)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
             "segment_ids": np.ones((b, t), np.int32),
             "old_logp": np.full((b, t), -2.0, np.float32),
             "ref_logp": np.full((b, t), -2.0, np.float32),
             "advantages": np.ones((b,), np.float32), "fresh": np.ones((b,), np.float32),
             "long_rope": np.full((b,), int(t > cfg.original_max_position_embeddings),
                                  np.int32),
             # RL scores at the sampling temperature over the tokenizer's ids (stages/rl/rollouts).
             "temperature": np.full((b,), 0.6, np.float32),
             "vocab_limit": np.full((b,), cfg.vocab_size, np.int32)}
    batch = jax.tree.map(jnp.asarray, batch)
    loss_fn = functools.partial(grpo_batch_loss, clip_eps=0.2, kl_beta=0.0,
                                aggregation="token", chunk_size=c.chunk_size)

    def step(params, opt_state, batch):
        def loss(p):
            total, weight, _ = loss_fn(nnx.merge(graphdef, p), batch)
            return total / weight
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    compiled, compile_s, xla_peak = bench.compile_step(step, params, opt_state, batch)
    params, opt_state, value, times = bench.timed_steps(compiled, params, opt_state, batch,
                                                        c.steps)
    est = memory.estimate(cfg, seq_len=t, batch_per_device=b, chunk_size=c.chunk_size)
    stats = dev.memory_stats() or {}
    peak_after, limit = stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
    # The allocator's peak is process-wide: it is this step's only if the step raised it.
    runtime_peak = peak_after if peak_after and peak_after > (peak_before or 0) else None
    gib = 2 ** 30
    out.update({"model": c.model_preset, "params": param_count(cfg), "seq_len": t, "batch": b,
           "attention_impl": c.attention_impl,
           "resolved_attention": attn_lib.resolve_impl(c.attention_impl, segmented=True,
                                                       dtype=c.dtype),
           "remat_policy": c.remat_policy, "chunk_size": c.chunk_size, "compile_s": compile_s,
           "step_s": min(times), "loss": float(value), "xla_peak_gib": xla_peak / gib,
           "runtime_peak_gib": runtime_peak / gib if runtime_peak else None,
           "estimated_gib": est["total"] / gib,
           "estimate_over_xla": est["total"] / xla_peak,
           "device_limit_gib": limit / gib if limit else None})
    _check(checks, "RL step loss is finite", 0.0 if np.isfinite(out["loss"]) else 1.0, 0.0,
           "correctness")
    if limit:
        _check(checks, "RL step XLA peak / device memory", xla_peak / limit, 1.0, "target")


# ------------------------------------------------------------------------ driver
SECTIONS = ("correctness", "ceilings", "train_step", "decode", "rl_memory")


def _table(result: dict) -> str:
    lines = [f"device check: {result['device']} ({result['backend']}, jax {result['jax']}), "
             f"{result['total_s']:.0f} s"]
    for name, sec in result["sections"].items():
        status = sec.get("status")
        lines.append(f"[{name}] {status} in {sec.get('wall_s', 0):.1f} s"
                     + (f": {sec['error']}" if sec.get("error") else ""))
    width = max([len(c["name"]) for c in result["checks"]] + [10])
    for c in result["checks"]:
        mark = "PASS" if c["passed"] else ("FAIL" if c["kind"] == "correctness" else "MISS")
        lines.append(f"  {mark}  {c['name']:<{width}}  {c['value']:.4g} {c['op']} "
                     f"{c['limit']:.4g}  ({c['kind']})")
    figures = []
    sec = result["sections"]
    if "train_step" in sec and "model_tflop_per_s" in sec["train_step"]:
        ts = sec["train_step"]
        figures.append(f"train step: {ts['tokens_per_s']:.0f} tokens/s, "
                       f"{ts['model_tflop_per_s']:.1f} model TFLOP/s, MFU {ts['mfu']:.1%} of "
                       f"{ts['matmul_ceiling_tflop_per_s']:.3g}, {ts['num_layers']} layers")
    for key, val in sec.get("decode", {}).items():
        if key.startswith("batch") and isinstance(val, dict):
            figures.append(f"decode {key}: {val['ms_per_step']:.3f} ms/step, floor "
                           f"{val['floor_ms']:.3f} ms ({val['ratio_to_floor']:.2f}x)")
    rl = sec.get("rl_memory", {})
    if "xla_peak_gib" in rl:
        figures.append(f"RL step {rl['seq_len']} tokens: XLA peak {rl['xla_peak_gib']:.2f} GiB,"
                       f" estimate {rl['estimated_gib']:.2f} GiB, runtime peak "
                       f"{rl['runtime_peak_gib']}")
    return "\n".join(lines + figures)


def run(config: ConfigDict) -> dict:
    d = config.device
    wanted = [s.strip() for s in str(d.sections).split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown device-check sections {sorted(unknown)}; choose from "
                         f"{SECTIONS}")
    dev = jax.devices()[0]
    result = {"bench": "device", "backend": jax.default_backend(), "device": dev.device_kind,
              "jax": jax.__version__, "sections": {}, "checks": []}
    start = time.perf_counter()
    bandwidth = None
    for name in wanted:
        elapsed = time.perf_counter() - start
        if elapsed > d.time_budget_s:
            result["sections"][name] = {"status": "skipped",
                                        "error": f"time budget: {elapsed:.0f} s spent"}
            continue
        log.info("device check: %s", name)
        t0 = time.perf_counter()
        checks: list = []
        out: dict = {}
        try:  # sections fill `out` as they go: figures measured before an error are kept
            if name == "decode":
                section_decode(d, checks, out, bandwidth)
            else:
                globals()[f"section_{name}"](d, checks, out)
            if name == "ceilings":
                bandwidth = out["hbm_gb_per_s"] * 1e9
            out["status"] = "ok"
        except Exception as e:  # recorded; the next section still runs
            log.error("device check section %s failed:\n%s", name, traceback.format_exc())
            out.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        out["wall_s"] = time.perf_counter() - t0
        for c in checks:
            c["section"] = name
        result["sections"][name] = out
        result["checks"].extend(checks)
        gc.collect()  # drop the section's device buffers before the next one allocates
        _summarise(result, start)
        _write(result, config.workdir)  # after every section: a killed run keeps what it had
    _summarise(result, start)
    print(_table(result), flush=True)
    _write(result, config.workdir)
    return result


def _summarise(result: dict, start: float) -> None:
    result["total_s"] = time.perf_counter() - start
    correctness = [c for c in result["checks"] if c["kind"] == "correctness"]
    result["correctness_passed"] = bool(correctness) and all(c["passed"] for c in correctness)
    result["sections_failed"] = [n for n, s in result["sections"].items()
                                 if s["status"] != "ok"]


def _write(result: dict, workdir: str) -> None:
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "bench_device.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)


__all__ = ["run", "hbm_bandwidth", "SECTIONS"]
