"""Fields every stage config shares (stage configs in configs/ start from `base_config`)."""

from __future__ import annotations

from ml_collections import ConfigDict

from phimr_jax.model.sharding import DEFAULT_RULES


def base_config(stage: str) -> ConfigDict:
    c = ConfigDict()
    c.stage = stage  # Which runner main.py dispatches to (see phimr_jax/main.py STAGES).
    c.workdir = ""  # Run directory: checkpoints/, metrics, tokenizer/ live here.
    c.seed = 0  # Seed of parameter init, data order and sampling.
    # Device mesh sizes per axis; one may be -1 for "all remaining devices".
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Logical axis name -> mesh axis (or list of axes, or None = replicated). One table for
    # parameters and activations; see phimr_jax/model/sharding.py.
    c.sharding_rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])]
                        for r in DEFAULT_RULES]
    return c


def train_config(stage: str) -> ConfigDict:
    """The common fields of every training stage, with demo-sized defaults."""
    c = base_config(stage)
    c.total_steps = -1  # Optimizer steps; -1 = data.num_epochs over the data.
    c.log_every_steps = 10  # Average metrics over this many steps, write a metrics.jsonl line.
    c.checkpoint_every_steps = 100  # Save (asynchronously) every N steps, and at the end.
    c.keep_checkpoints = 3  # Keep the K newest checkpoints (0 = all).
    c.async_checkpoint = True  # Write checkpoints in the background while training goes on.
    c.eval_every_steps = 0  # Run the stage's evaluation every N steps (0 = only at the end).
    c.tensorboard = True  # Also write TensorBoard summaries when TensorFlow is installed.
    c.model = ConfigDict()
    c.model.preset = "demo"  # Architecture for a fresh init (demo | phi4_mini | tiny).
    c.model.overrides = ConfigDict()  # Extra ModelConfig fields for a fresh init.
    c.model.param_dtype = "float32"  # Master weights (and optimizer state) dtype.
    c.model.dtype = "float32"  # Compute dtype of the matmuls (bfloat16 for mixed precision).
    c.model.remat_policy = "none"  # Per-layer rematerialisation: none | full | dots.
    c.init = ConfigDict()
    c.init.checkpoint = ""  # Start from another run's latest checkpoint (its run directory).
    c.init.hf_dir = ""  # Or from an HF Phi3 directory; neither = fresh model.preset weights.
    c.optim = ConfigDict()
    c.optim.learning_rate = 1e-5  # Peak learning rate (paper: 1e-5 for stages 1 and 2).
    c.optim.warmup_fraction = 0.1  # Linear warmup over this fraction of total_steps.
    c.optim.decay = "cosine"  # After warmup: cosine | linear | constant.
    c.optim.end_lr_fraction = 0.0  # Final learning rate as a fraction of the peak.
    c.optim.b1 = 0.9  # AdamW beta1.
    c.optim.b2 = 0.95  # AdamW beta2.
    c.optim.eps = 1e-8  # AdamW epsilon.
    c.optim.weight_decay = 0.0  # Decoupled weight decay (not on norm scales).
    c.optim.grad_clip_norm = 1.0  # Clip the global gradient norm (0 = off).
    c.optim.grad_accum_steps = 1  # Microbatches per optimizer step (scanned in one jit).
    c.loss = ConfigDict()
    c.loss.chunk_size = 1024  # Sequence chunk for the LM head: no [seq, vocab] f32 logits.
    return c
