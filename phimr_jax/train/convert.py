"""Stages `convert` (HF directory -> Orbax run checkpoint), `export` (run -> HF directory) and
`init` (a fresh model from a preset -> Orbax run checkpoint).

convert: reads an HF Phi3 checkpoint tensor by tensor straight into the configured mesh, copies
its tokenizer files into `workdir/tokenizer/`, and writes `workdir/checkpoints/<step>/`.
export: restores a run's checkpoint (default: the latest) into the mesh and writes an HF
directory (config.json, generation_config.json, safetensors + index), with the run's tokenizer
(or `tokenizer_dir`) beside them as an HF tokenizer with the chat template (a demo
SentencePiece tokenizer is converted; see data/hf_tokenizer_export.py).
"""

from __future__ import annotations

import logging
import os

from ml_collections import ConfigDict

from phimr_jax.data.hf_tokenizer_export import copy_tokenizer_files, write_hf_tokenizer
from phimr_jax.model.hf_io import load_hf, save_hf
from phimr_jax.model.phi3 import param_count
from phimr_jax.train import checkpointing
from phimr_jax.train.config_base import mesh_and_rules

log = logging.getLogger(__name__)


def _require(config: ConfigDict, *names: str) -> None:
    missing = [n for n in names if not config.get(n)]
    if missing:
        raise ValueError("missing required option(s): "
                         + ", ".join(f"--config.{n}=..." for n in missing))


def run_convert(config: ConfigDict) -> str:
    _require(config, "hf_dir", "workdir")
    mesh, rules = mesh_and_rules(config)
    model = load_hf(config.hf_dir, dtype=config.dtype, mesh=mesh, rules=rules)
    tok_dst = os.path.join(os.path.abspath(config.workdir), "tokenizer")
    copied = copy_tokenizer_files(config.tokenizer_dir or config.hf_dir, tok_dst)
    info = checkpointing.run_info(model, stage="convert", tokenizer_dir=tok_dst if copied else "",
                                  source=os.path.abspath(config.hf_dir))
    checkpointing.save_model(config.workdir, model, step=config.step, info=info)
    log.info("converted %s (%s params, %s) -> %s step %d%s", config.hf_dir,
             f"{param_count(model.config):,}", model.config.param_dtype,
             checkpointing.checkpoint_dir(config.workdir), config.step,
             f"; tokenizer files {copied}" if copied else "; no tokenizer files found")
    return checkpointing.checkpoint_dir(config.workdir)


def run_export(config: ConfigDict) -> str:
    _require(config, "workdir", "out_dir")
    mesh, rules = mesh_and_rules(config)
    model, info, step = checkpointing.restore_model(config.workdir, config.step, mesh, rules)
    save_hf(model, config.out_dir, dtype=config.dtype or None,
            max_shard_size=int(config.max_shard_size_mb) * 1024 * 1024,
            rope_format=config.rope_format)
    tok_src = config.tokenizer_dir or info.get("tokenizer_dir", "")
    copied = write_hf_tokenizer(tok_src, config.out_dir) if tok_src else []
    log.info("exported %s step %d -> %s%s", config.workdir, step, config.out_dir,
             f" with tokenizer files {copied}" if copied else
             " (run knows no tokenizer; pass --config.tokenizer_dir to add one)")
    return config.out_dir


def run_init(config: ConfigDict) -> str:
    """A fresh model from a preset, created directly in its sharding, saved as step `step`."""
    from phimr_jax.model.config import preset
    from phimr_jax.model.phi3 import init_model

    _require(config, "workdir", "model_preset")
    mesh, rules = mesh_and_rules(config)
    cfg = preset(config.model_preset, param_dtype=config.dtype)
    model = init_model(cfg, seed=config.seed, mesh=mesh, rules=rules)
    info = checkpointing.run_info(model, stage="init", tokenizer_dir=config.tokenizer_dir)
    checkpointing.save_model(config.workdir, model, step=config.step, info=info)
    log.info("initialised %s model (%s params, %s, seed %d) -> %s step %d", config.model_preset,
             f"{param_count(cfg):,}", cfg.param_dtype, config.seed,
             checkpointing.checkpoint_dir(config.workdir), config.step)
    return checkpointing.checkpoint_dir(config.workdir)
