"""The correctness section of the device check (`bench_device`, `configs/bench.py:device`),
and the check-recording helpers the other sections share.

- `section_correctness`: a small random Phi3 with unit-scale weights and logits of std ~1 (so
  a wrong mapping cannot hide under the tolerance, and 1e-4 means the same at every width).
  Our logits against transformers' torch forward on CPU, in float32 (highest matmul
  precision: on GPUs the default lets XLA use TF32; absolute error) and in bfloat16 (RMS
  relative error), once per attention implementation; greedy `generate` tokens against HF
  `generate` (crossing the LongRoPE switch point); blockwise and cuDNN attention against the
  XLA reference in value and gradient (dq, dk, dv), with and without segment ids. Where an
  implementation cannot run (cuDNN off GPU, cuDNN with segment ids) the fallback that really
  ran is recorded as `resolved`, so a CPU pass never reads as a cuDNN pass.
- `_check` records one pass/fail (kind "correctness" or "target"); `_part` runs one part of a
  section and records its exception as a failed check; `_rel` / `_rms_rel` are the error
  measures.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from phimr_jax.model import attention as attn_lib
from phimr_jax.model.config import preset
from phimr_jax.model.phi3 import param_count

log = logging.getLogger(__name__)


def _check(checks: list, name: str, value, limit, kind: str, higher_is_better=False) -> bool:
    """Record one check: value <= limit (or >= when higher_is_better); NaN fails."""
    value = float(value)
    passed = bool(value >= limit if higher_is_better else value <= limit)
    checks.append({"name": name, "value": value, "limit": float(limit), "kind": kind,
                   "op": ">=" if higher_is_better else "<=", "passed": passed})
    return passed


def _part(checks: list, out: dict, name: str, fn, *args) -> None:
    """Run one part of a section; an exception is recorded as `out[name + "_error"]` and as a
    failed correctness check (a part that did not run never passes), and the section goes on."""
    try:
        fn(*args)
    except Exception as e:
        log.error("device check part %s failed:\n%s", name, traceback.format_exc())
        out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
        _check(checks, f"{name} ran", 1.0, 0.0, "correctness")


def _rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _rms_rel(a, b) -> float:
    """||a - b|| / ||b|| (root mean square): the bf16 logits' error, steadier than the max."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b ** 2), 1e-30)))


# ------------------------------------------------------------------------ correctness
def _unit_scale_hf(cfg, path: str, seed: int = 0):
    """A random transformers Phi3 whose logits are O(1), saved to `path`; returns the torch
    model (float32, eval). Weights std 1/sqrt(fan_in), norms 1 + noise, and the (tied)
    embedding std 1/sqrt(hidden), so the logits of the unit-RMS final hidden states have std
    ~1: an absolute tolerance then means the same at every width. (Unit embeddings give logits
    of std sqrt(hidden): 4.6e-4 max f32 difference at hidden 512 on CPU, 5e-6 relative.)"""
    import torch
    import transformers

    hf_cfg = transformers.Phi3Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"  # the plain reference (as tests/hf_reference.py)
    hf = transformers.Phi3ForCausalLM(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:  # Linear [out, in]: 1/sqrt(in); the embedding [vocab, hidden]: 1/sqrt(hidden)
                p.copy_(noise / np.sqrt(p.shape[1]))
    hf.save_pretrained(path)
    return hf


def _logits_checks(c: ConfigDict, path: str, hf, checks: list, out: dict) -> None:
    import torch

    from phimr_jax.model.hf_io import load_hf

    vocab = hf.config.vocab_size
    ids = np.random.default_rng(1).integers(4, vocab, size=(c.batch_size, c.seq_len))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.float().numpy()
        hf16 = copy.deepcopy(hf).to(torch.bfloat16)
        want_bf16 = hf16(torch.tensor(ids)).logits.float().numpy()
        del hf16
    # transformers' own bf16 forward against its f32 one: context for our bf16 figure.
    out["hf_bf16_rms_rel_err"], out["hf_bf16_max_rel_err"] = (_rms_rel(want_bf16, want),
                                                              _rel(want_bf16, want))
    out["hf_logit_std"], out["hf_logit_max_abs"] = float(want.std()), float(np.abs(want).max())
    ids = jnp.asarray(ids, jnp.int32)
    done = {}  # (dtype, resolved impl) -> error: a fallback (cudnn on CPU) is not run twice
    for dtype, impls in (("float32", c.impls_f32), ("bfloat16", c.impls_bf16)):
        for impl in [s.strip() for s in impls.split(",") if s.strip()]:
            resolved = attn_lib.resolve_impl(impl, segmented=False, dtype=dtype)
            key = f"logits_{dtype}_{impl}"
            out[f"{key}_resolved"] = resolved
            if (dtype, resolved) not in done:
                model = load_hf(path, dtype=dtype, attention_impl=impl,
                                attention_block_size=c.block_size)
                graphdef, state = nnx.split(model)
                fwd = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x))
                if dtype == "float32":
                    with jax.default_matmul_precision("highest"):
                        done[dtype, resolved] = float(np.abs(np.asarray(fwd(state, ids))
                                                             - want).max())
                else:
                    got = np.asarray(fwd(state, ids))
                    done[dtype, resolved] = _rms_rel(got, want)
                    out[f"logits_{dtype}_{resolved}_max_rel_err"] = _rel(got, want)
            err = done[dtype, resolved]
            if dtype == "float32":
                out[f"{key}_max_abs_err"] = err
                _check(checks, f"{key} ({resolved}) max|diff| vs HF f32", err, c.f32_tolerance,
                       "correctness")
            else:
                out[f"{key}_rms_rel_err"] = err
                _check(checks, f"{key} ({resolved}) rms rel err vs HF f32", err,
                       c.bf16_rms_rel_tolerance, "correctness")


def _sampler_check(c: ConfigDict, path: str, hf, checks: list, out: dict) -> None:
    import torch

    from phimr_jax.model.hf_io import load_hf
    from phimr_jax.model.sampling import generate

    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    model = load_hf(path)
    rng = np.random.default_rng(2)
    prompts = rng.integers(4, hf.config.vocab_size,
                           size=(c.sampler_prompts, c.sampler_prompt_len)).tolist()
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), max_new_tokens=c.sampler_new_tokens,
                           min_new_tokens=c.sampler_new_tokens, do_sample=False)
    want = want[:, c.sampler_prompt_len:].tolist()
    with jax.default_matmul_precision("highest"):
        got = generate(model, prompts, max_new_tokens=c.sampler_new_tokens, top_k=1,
                       stop_tokens=[]).tokens
    differing = sum(a != b for g, w in zip(got, want) for a, b in zip(g, w))
    out["greedy_tokens_compared"] = c.sampler_prompts * c.sampler_new_tokens
    out["greedy_tokens_differing"] = differing
    _check(checks, "greedy generate tokens differing from HF generate", differing, 0,
           "correctness")


def _attention_checks(c: ConfigDict, checks: list, out: dict) -> None:
    b, t, h, k, hd = (c.attn_batch, c.attn_seq_len, c.attn_heads, c.attn_kv_heads,
                      c.attn_head_dim)
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, t, h, hd), jnp.float32)
    kk = jax.random.normal(keys[1], (b, t, k, hd), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, k, hd), jnp.float32)
    dout = jax.random.normal(keys[3], (b, t, h, hd), jnp.float32)
    # Two documents and trailing padding (segment 0) in every row.
    seg = np.zeros((b, t), np.int32)
    seg[:, : t * 5 // 8], seg[:, t * 5 // 8: t * 7 // 8] = 1, 2
    seg = jnp.asarray(seg)

    def value_and_grads(fn, *xs):
        o, vjp = jax.vjp(fn, *xs)
        return (o,) + vjp(dout.astype(o.dtype))

    for segmented in (False, True):
        s = seg if segmented else None
        mask = attn_lib.dense_mask(t, t, s, s)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(functools.partial(value_and_grads,
                                            lambda q, k, v: attn_lib.xla_attention(q, k, v,
                                                                                   mask)))
            ref32 = [np.asarray(x) for x in ref(q, kk, v)]
            # The bf16 reference: f32 math on the bf16-rounded inputs.
            rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, kk, v)]
            ref16 = [np.asarray(x) for x in ref(*rounded)]
        done = {}  # (resolved impl, dtype) -> error, as in _logits_checks
        for impl in [x.strip() for x in c.attn_impls.split(",") if x.strip()]:
            for dtype in ("float32", "bfloat16"):
                resolved = attn_lib.resolve_impl(impl, segmented=segmented, dtype=dtype)
                name = f"attn_{impl}_{dtype}_{'segments' if segmented else 'causal'}"
                out[f"{name}_resolved"] = resolved
                if (resolved, dtype) not in done:
                    fn = attn_lib.make_attention(impl, t=t, s=t, q_segment_ids=s,
                                                 kv_segment_ids=s, dtype=dtype,
                                                 block_size=c.attn_block_size)
                    run = jax.jit(functools.partial(value_and_grads, fn))
                    xs = [x.astype(dtype) for x in (q, kk, v)]
                    if dtype == "float32":
                        with jax.default_matmul_precision("highest"):
                            got = [np.asarray(x) for x in run(*xs)]
                        done[resolved, dtype] = max(_rel(a, r) for a, r in zip(got, ref32))
                    else:
                        got = [np.asarray(x.astype(jnp.float32)) for x in run(*xs)]
                        done[resolved, dtype] = max(_rel(a, r) for a, r in zip(got, ref16))
                err = done[resolved, dtype]
                out[f"{name}_rel_err"] = err
                _check(checks, f"{name} ({resolved}) out+grads rel err vs xla", err,
                       c.attn_f32_rel_tolerance if dtype == "float32"
                       else c.attn_bf16_rel_tolerance, "correctness")


def section_correctness(d: ConfigDict, checks: list, out: dict) -> None:
    c = d.correctness
    cfg = preset(c.model_preset, **dict(c.model_overrides))
    out.update(model=c.model_preset, params=param_count(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        hf = _unit_scale_hf(cfg, tmp)
        _part(checks, out, "logits", _logits_checks, c, tmp, hf, checks, out)
        _part(checks, out, "greedy_sampler", _sampler_check, c, tmp, hf, checks, out)
    _part(checks, out, "attention", _attention_checks, c, checks, out)
