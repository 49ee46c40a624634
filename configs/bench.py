"""Benchmarks that print their figures (and write workdir/bench_<name>.json if workdir is set).

  python -m phimr_jax.main --config=configs/bench.py:sampler     # generate vs HF generate
  python -m phimr_jax.main --config=configs/bench.py:forward     # jitted forward vs HF forward
  python -m phimr_jax.main --config=configs/bench.py:train_step  # tokens/s, TFLOP/s, MFU, memory
  python -m phimr_jax.main --config=configs/bench.py:train_step_demo  # the demo recipe's step
  python -m phimr_jax.main --config=configs/bench.py:sampler_calls  # 1 vs 2 sampler calls at once
  python -m phimr_jax.main --config=configs/bench.py:all         # the first three, one JSON each
  python -m phimr_jax.main --config=configs/bench.py:device      # the GPU check (BENCHMARKS.md)
  python -m phimr_jax.main --config=configs/bench.py:device_smoke  # the same at toy sizes, CPU
"""

from ml_collections import ConfigDict

from phimr_jax.train.config_base import base_config

BENCHES = ("sampler", "forward", "train_step", "train_step_demo", "sampler_calls", "all",
           "device", "device_smoke")

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
    # Which benchmark: sampler | forward | train_step | all (train_step_demo runs train_step).
    c.bench = "train_step" if arg == "train_step_demo" else arg
    c.sampler = ConfigDict()
    c.sampler.model_preset = "tiny"  # Small Phi3 architecture, on this CPU machine.
    c.sampler.model_overrides = ConfigDict(SMALL_PHI)
    c.sampler.batch_size = 8  # Rows generated at once.
    c.sampler.prompt_len = 32  # Prompt tokens per row.
    c.sampler.new_tokens = 128  # Generated tokens per row (no early stop).
    c.sampler.repeats = 3  # Timed repetitions; the best is reported.
    # Decoding on both sides: temperature 0 = greedy (the default; the perf target's setting);
    # e.g. 0.6 with top_p 0.95 = the evaluation protocol's nucleus sampling, which HF then
    # samples too (do_sample). Tokens differ between the two then; the work per step does not.
    c.sampler.temperature = 0.0
    c.sampler.top_p = 1.0
    # Our model's compute dtype (float32 master weights either way); the demo presets compute
    # in "auto" (bfloat16 with bfloat16 units, else float32). HF always runs float32.
    c.sampler.dtype = "float32"
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
    if arg == "train_step_demo":
        # The demo recipe's stage-1 step: demo model, 16 packed rows of 256 tokens, a Python
        # loop over its 4 layers, "auto" compute over float32 master weights, blockwise
        # attention in 64-token blocks (configs/midtrain.py:demo). The issue-18 "before" figure
        # is the same command with --config.train_step.dtype=float32 and attention_impl=xla.
        c.train_step.model_preset = "demo"
        c.train_step.model_overrides = ConfigDict()
        c.train_step.batch_size = 16
        c.train_step.seq_len = 256
        c.train_step.chunk_size = 1024
        c.train_step.scan_layers = False
        c.train_step.dtype = "auto"  # As the demo presets: float32 on CPUs without bf16 units.
        c.train_step.attention_impl = "blockwise"
    # The demo recipe's sampler calls, one at a time vs two at once (tools/bench_calls.py).
    c.sampler_calls = ConfigDict()
    c.sampler_calls.model_preset = "demo"  # The demo recipe's model (random weights).
    c.sampler_calls.dtype = "auto"  # As the demo presets.
    c.sampler_calls.prompts = 128  # Prompts in all (4 calls).
    c.sampler_calls.prompts_per_call = 32  # As RL's demo rollouts: 32 prompts x 8 = 256 rows.
    c.sampler_calls.samples = 8  # Completions per prompt (RL's group size).
    c.sampler_calls.min_prompt_len = 30  # Prompt lengths drawn uniformly in this range
    c.sampler_calls.max_prompt_len = 53  # (the demo's prompts: up to 53 tokens).
    c.sampler_calls.new_tokens = 160  # Decoded per row (no stop token).
    c.sampler_calls.repeats = 2  # Timed repetitions of each way, alternating; the best counts.
    if arg in ("device", "device_smoke"):
        c.stage = "bench_device"  # phimr_jax/tools/bench_device.py (see main.py STAGES).
        c.device = device_config(c.train_step, smoke=arg == "device_smoke")
    return c


def _ramp(n, lo, hi):
    """A geometric LongRoPE factor ramp of length n (non-trivial factors for the parity model)."""
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def device_config(train_step: ConfigDict, smoke: bool) -> ConfigDict:
    """The one-command GPU check (phimr_jax/tools/bench_device.py). `device`: the sizes for one
    H200 within 8 minutes; `device_smoke`: the same code at toy sizes for the CPU test suite."""
    d = ConfigDict()
    # Sections run in this order; each is guarded, so one failure still reports the others.
    d.sections = "correctness,ceilings,train_step,decode,rl_memory"
    # A section that would start after this many seconds of the run is skipped (and recorded).
    d.time_budget_s = 420.0 if not smoke else 600.0

    d.correctness = ConfigDict()
    d.correctness.model_preset = "tiny"  # Small random Phi3 (LongRoPE 64 -> 1024, GQA).
    # Device: head_dim 128 (cuDNN's shape); smoke: the tiny preset as it is (head_dim 16).
    d.correctness.model_overrides = ConfigDict({} if smoke else {
        "hidden_size": 512, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024,
        "vocab_size": 4096, "short_factor": _ramp(48, 1.0, 1.5),
        "long_factor": _ramp(48, 1.0, 12.0)})
    d.correctness.batch_size = 2  # Rows of the logits comparison.
    # Tokens per row (> 64: the long RoPE regime). The f32 difference from HF grows with the
    # position (sin/cos of f32 angles): 1.9e-5 at positions < 128, 6.1e-5 at 384-511 (CPU).
    d.correctness.seq_len = 64 if smoke else 256
    d.correctness.block_size = 16 if smoke else 128  # Blockwise block of the model checks.
    d.correctness.impls_f32 = "xla,blockwise"  # Our logits in float32, each against HF f32.
    d.correctness.impls_bf16 = "xla,blockwise,cudnn"  # And in bfloat16 (cudnn: GPU only).
    d.correctness.f32_tolerance = 1e-4  # max |logit - HF f32 logit| in float32 (the issue's).
    # bf16: ||ours - HF f32|| / ||HF f32|| over the logits (std ~1). Measured on CPU: 2.0e-2
    # (smoke model) and 2.2e-2 (device model); transformers' own bf16 forward 2.3e-2 and
    # 6.4e-2. The random unit-scale network amplifies bf16 rounding (2^-8 relative) ~5x.
    d.correctness.bf16_rms_rel_tolerance = 4e-2
    d.correctness.sampler_prompts = 2  # Greedy prompts compared with HF generate.
    d.correctness.sampler_prompt_len = 40  # 40 + new tokens crosses the 64-token LongRoPE switch.
    d.correctness.sampler_new_tokens = 32
    # Attention kernels against the XLA reference (value and gradient, +- segment ids).
    d.correctness.attn_batch = 2
    d.correctness.attn_seq_len = 64 if smoke else 1024
    d.correctness.attn_heads = 4 if smoke else 24  # Phi-4-mini: 24 query / 8 KV heads, 128 dims.
    d.correctness.attn_kv_heads = 2 if smoke else 8
    d.correctness.attn_head_dim = 16 if smoke else 128
    d.correctness.attn_block_size = 16 if smoke else 256
    d.correctness.attn_impls = "blockwise,cudnn"
    # Error of the output and of dq, dk, dv: max |impl - reference| / max |reference|, the
    # worst of the four. float32 (highest precision): measured <= 1.1e-6 at the device shapes
    # on CPU. bf16 (against f32 math on the same bf16-rounded inputs): 3.7e-3 (smoke shapes)
    # and 4.9e-3 (device shapes), CPU.
    d.correctness.attn_f32_rel_tolerance = 1e-5
    d.correctness.attn_bf16_rel_tolerance = 2e-2

    d.ceilings = ConfigDict()
    d.ceilings.matmul_size = 128 if smoke else 8192  # n of the timed [n, n] @ [n, n] matmul.
    d.ceilings.matmul_dtype = "bfloat16"
    d.ceilings.bandwidth_mib = 16 if smoke else 4096  # Array streamed by the bandwidth probes.
    d.ceilings.repeats = 2 if smoke else 10  # Best of this many timings.

    # The train step: configs' `train_step` bench (phimr_jax/tools/bench.py) at Phi-4-mini shape.
    d.train_step = ConfigDict(train_step.to_dict())
    d.train_step.model_overrides = ConfigDict()  # (update() would merge into SMALL_PHI)
    if smoke:
        d.train_step.update(model_preset="tiny", batch_size=1, seq_len=64,
                            chunk_size=32, attention_impl="cudnn", attention_block_size=16,
                            remat_policy="full", dtype="bfloat16", steps=2, matmul_size=128)
    else:  # bf16 matmuls over f32 master weights and AdamW state (the recipe's phi4_mini
        # training), all 32 layers, 8K tokens, full remat, a 2048-token LM-head chunk.
        d.train_step.update(model_preset="phi4_mini", batch_size=1,
                            seq_len=8192, chunk_size=2048, attention_impl="cudnn",
                            attention_block_size=512, remat_policy="full", dtype="bfloat16",
                            steps=5, matmul_size=8192)
    d.train_step_target_tflop_per_s = 500.0  # MaxText's published class per H100/H200 chip.
    # Layers of the train-step model (0 = the preset's, 32). Fewer, if 32 do not fit the time:
    # the JSON then gives the layer count and tokens/s scaled to full depth at the same TFLOP/s.
    d.train_step_layers = 0
    # If the train step fails with train_step.attention_impl (cuDNN), it is rerun with this one
    # and both are recorded ("" = no rerun): a figure from the other kernel beats none.
    d.train_step_fallback_impl = "blockwise"

    d.decode = ConfigDict()
    d.decode.model_preset = "tiny" if smoke else "phi4_mini"  # bf16 weights, random init.
    d.decode.model_overrides = ConfigDict({})
    d.decode.batch_sizes = "1,8,32"  # One compiled decode loop per batch size.
    d.decode.context = 32 if smoke else 2048  # Cache slots already filled before the steps.
    d.decode.steps = 8 if smoke else 128  # Decode steps in one jitted loop (one timing).
    d.decode.repeats = 2 if smoke else 3  # Best of this many loops.
    d.decode.target_floor_ratio = 1.2  # ms/step <= this x (param + KV bytes) / bandwidth.
    # One `generate` compile serves this temperature schedule (RL annealing 1.0 -> 0.6).
    d.decode.schedule_temperatures = "1.0,0.8,0.6"
    d.decode.schedule_batch = 8  # Rows of the schedule's generate calls.
    d.decode.schedule_prompt_len = 16 if smoke else 64
    d.decode.schedule_new_tokens = 8 if smoke else 64
    d.decode.schedule_top_p = 1.0  # Rollouts sample the policy itself (configs/rl.py).

    d.rl_memory = ConfigDict()
    d.rl_memory.model_preset = "tiny" if smoke else "phi4_mini"
    d.rl_memory.model_overrides = ConfigDict({})
    d.rl_memory.seq_len = 128 if smoke else 25600  # configs/rl.py:phi4_mini's row length.
    d.rl_memory.prompt_len = 32 if smoke else 1024  # Prompt tokens (no loss) of the row.
    d.rl_memory.batch_size = 1  # Rows per device.
    d.rl_memory.chunk_size = 32 if smoke else 2048  # loss.chunk_size of phi4_mini presets.
    # RL rows carry segment ids (padding), so cuDNN would fall back to blockwise anyway.
    d.rl_memory.attention_impl = "blockwise"
    d.rl_memory.attention_block_size = 16 if smoke else 512
    d.rl_memory.remat_policy = "full"
    d.rl_memory.dtype = "bfloat16"  # Compute; parameters and AdamW state stay float32.
    d.rl_memory.steps = 1  # Executed steps (after compiling): the peak needs one.
    return d
