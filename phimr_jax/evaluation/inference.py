"""What the generate and eval stages share: a model + tokenizer to sample from, and batched
chat-format sampling of many questions."""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from ml_collections import ConfigDict

from phimr_jax.data.tokenizers import load_tokenizer
from phimr_jax.model.hf_io import load_hf
from phimr_jax.model.sampling import GenerateResult
from phimr_jax.model.sampling_calls import generate_in_calls
from phimr_jax.train import checkpointing
from phimr_jax.train.config_base import mesh_and_rules
from phimr_jax.train.metrics import Countdown

log = logging.getLogger(__name__)


def sampling_config() -> ConfigDict:
    """Fields that pick the model and how to sample from it (generate and eval stages)."""
    c = ConfigDict()
    c.hf_dir = ""  # Sample from an HF Phi3 directory (weights + tokenizer) ...
    c.checkpoint = ""  # ... or from a run directory's latest checkpoint (its tokenizer too).
    c.tokenizer = ""  # Tokenizer directory / .model file overriding the model's own.
    c.dtype = "bfloat16"  # Parameter and compute dtype for sampling (float32 | bfloat16).
    c.max_new_tokens = 1024  # Generation budget per completion (paper's eval: up to 32768).
    c.temperature = 0.6  # Paper's evaluation temperature (0 = greedy).
    c.top_p = 0.95  # Nucleus sampling mass (1.0 = off).
    c.top_k = 0  # Keep the k most likely tokens (0 = off, 1 = greedy).
    c.num_samples = 1  # Completions per prompt.
    c.batch_size = 64  # Prompts per sampler call (each call holds batch x samples rows).
    c.rope_mode = "hf"  # LongRoPE at the 4096 crossing: hf (re-encode, as transformers) | fixed.
    c.system = ""  # Extra system message (appended after the Phi-4-mini-reasoning preamble).
    c.reasoning = True  # Phi-4-mini-reasoning chat format (False: the instruct format).
    return c


def load_model_and_tokenizer(config: ConfigDict):
    """(model, tokenizer) from config.hf_dir or config.checkpoint, sharded over config.mesh."""
    mesh, rules = mesh_and_rules(config)
    if bool(config.hf_dir) == bool(config.checkpoint):
        raise ValueError("give exactly one of --config.hf_dir=... or --config.checkpoint=...")
    if config.hf_dir:
        model = load_hf(config.hf_dir, dtype=config.dtype, mesh=mesh, rules=rules)
        tok_dir = config.hf_dir
    else:
        model, info, _ = checkpointing.restore_model(config.checkpoint, None, mesh, rules)
        if config.dtype != model.config.param_dtype:
            from phimr_jax.train.state import with_model_config
            model = with_model_config(model, param_dtype=config.dtype, dtype=config.dtype)
        tok_dir = info.get("tokenizer_dir", "")
    path = config.tokenizer or tok_dir
    if not path or not os.path.exists(path):
        raise ValueError("no tokenizer for this model: pass --config.tokenizer=DIR_OR_MODEL")
    return model, load_tokenizer("auto", path), mesh, rules


def sample_questions(model, tokenizer, questions: Sequence[str], config: ConfigDict,
                     seed: Optional[int] = None) -> GenerateResult:
    """Sample config.num_samples completions per question (chat format), in batches of
    config.batch_size questions formed in order of prompt length (`generate_in_calls`).
    Returns one GenerateResult, rows prompt-major in question order."""
    system = config.system or None
    prompts = [tokenizer.prompt_ids(q, system, config.reasoning) for q in questions]
    progress = Countdown("sampled prompts", len(prompts))
    return generate_in_calls(
        model, prompts, prompts_per_call=max(1, int(config.batch_size)),
        seed=config.seed if seed is None else seed, num_samples=config.num_samples,
        on_call=progress.update, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        stop_tokens=tokenizer.stop_ids, rope_mode=config.rope_mode, pad_id=tokenizer.pad_id,
        vocab_limit=tokenizer.vocab_size)
