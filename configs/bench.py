"""Benchmarks that print their figures (and write workdir/bench_<name>.json if workdir is set).

  python -m phimr_jax.main --config=configs/bench.py:sampler     # generate vs HF generate
  python -m phimr_jax.main --config=configs/bench.py:forward     # jitted forward vs HF forward
  python -m phimr_jax.main --config=configs/bench.py:train_step  # tokens/s, TFLOP/s, MFU, memory
  python -m phimr_jax.main --config=configs/bench.py:all         # the three, one JSON each
"""

from ml_collections import ConfigDict

from phimr_jax.train.config_base import base_config

BENCHES = ("sampler", "forward", "train_step", "all")

# 4 layers, hidden 256, GQA 8/4: the "4-layer model at batch 8" of the perf targets, small
# enough for this CPU machine. Every bench uses it unless told otherwise.
# Phi-4-mini's LongRoPE context (4096 original, 131072 max): the "tiny" preset's 64-token original
# context would make every sampler run cross it, and both samplers then re-encode the whole
# sequence once (HF's cache drop), which is not the decode speed being compared.
SMALL_PHI = {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 4,
             "intermediate_size": 512, "vocab_size": 2048, "short_factor": [1.0] * 12,
             "long_factor": [1.0] * 12, "original_max_position_embeddings": 4096,
             "max_position_embeddings": 131072}


def get_config(arg="sampler"):
    arg = arg or "sampler"
    if arg not in BENCHES:
        raise ValueError(f"unknown preset {arg!r}: {' | '.join(BENCHES)}")
    c = base_config("bench")
    c.bench = arg  # Which benchmark: sampler | forward | train_step | all.
    c.sampler = ConfigDict()
    c.sampler.model_preset = "tiny"  # Small Phi3 architecture, on this CPU machine.
    c.sampler.model_overrides = ConfigDict(SMALL_PHI)
    c.sampler.batch_size = 8  # Rows generated at once.
    c.sampler.prompt_len = 32  # Prompt tokens per row.
    c.sampler.new_tokens = 128  # Generated tokens per row (no early stop).
    c.sampler.repeats = 3  # Timed repetitions; the best is reported.
    # torch thread counts tried for HF (0 = all cores); HF's best is the baseline.
    c.sampler.hf_threads = "1,0"

    c.forward = ConfigDict()
    c.forward.model_preset = "tiny"
    c.forward.model_overrides = ConfigDict(SMALL_PHI)
    c.forward.batch_size = 8  # Rows per forward pass.
    c.forward.seq_len = 512  # Tokens per row; both sides return [batch, seq, vocab] f32 logits.
    c.forward.attention_impls = "xla,blockwise"  # Ours with each of these (comma-separated).
    c.forward.attention_block_size = 64  # Blockwise block: fastest of 32..512 on this CPU.
    c.forward.repeats = 5  # Timed repetitions; the best is reported.
    c.forward.hf_threads = "1,0"  # torch thread counts tried for HF; HF's best is the baseline.

    c.train_step = ConfigDict()
    c.train_step.model_preset = "tiny"
    c.train_step.model_overrides = ConfigDict(SMALL_PHI)
    c.train_step.batch_size = 4  # Rows per step (one device).
    c.train_step.seq_len = 512  # Tokens per row.
    c.train_step.chunk_size = 256  # loss.chunk_size of the chunked LM head.
    c.train_step.attention_impl = "xla"  # xla | blockwise | splash | cudnn.
    c.train_step.attention_block_size = 64  # Blockwise block (64: fastest on this CPU).
    c.train_step.remat_policy = "none"  # none | dots | full.
    c.train_step.scan_layers = True  # Layers under lax.scan (True) or a Python loop (False).
    c.train_step.dtype = "float32"  # Compute dtype (bfloat16 on accelerators).
    c.train_step.steps = 8  # Timed steps (after one warm-up step); the median is reported.
    c.train_step.matmul_size = 2048  # n of the [n, n] @ [n, n] matmul timed as the ceiling.
    return c
