"""Fields every stage config shares (stage configs in configs/ start from `base_config`)."""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from phimr_jax.model.sharding import DEFAULT_RULES, make_mesh


def base_config(stage: str) -> ConfigDict:
    c = ConfigDict()
    c.stage = stage  # Which runner main.py dispatches to (see phimr_jax/main.py STAGES).
    # Run directory: checkpoints/, metrics, tokenizer/ live here. "" = runs/<preset>/<stage>
    # under the current directory (main.py: `default_workdir`), named in the startup log.
    c.workdir = ""
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
    c.eval_every_steps = 0  # Run the stage's evaluation every N steps and at the end (0 = never).
    c.eval_at_start = False  # Also evaluate the initial model (logged at step 0) on a fresh run.
    c.tensorboard = True  # Also write every logged scalar to workdir/tensorboard/ (no TF needed).
    c.wandb = wandb_config()
    c.model = ConfigDict()
    c.model.preset = "demo"  # Architecture for a fresh init (demo | phi4_mini | tiny).
    c.model.overrides = ConfigDict()  # Extra ModelConfig fields for a fresh init.
    c.model.param_dtype = "float32"  # Master weights (and optimizer state) dtype.
    # Compute dtype of the matmuls: float32 | bfloat16 (mixed precision) | auto (bfloat16 on
    # accelerators and on CPUs with bfloat16 units, else float32: model/dtypes.py).
    c.model.dtype = "float32"
    c.model.remat_policy = "none"  # Per-layer rematerialisation: none | full | dots.
    # Decoder layers under lax.scan (True: one compiled layer, for deep models) or a Python loop
    # (False: faster for the 4-layer demo model on CPU, 0.65 -> 0.55 s per demo step).
    c.model.scan_layers = True
    # Attention kernel: "" = the model's (xla) | xla | blockwise | splash (TPU) | cudnn (GPU).
    c.model.attention_impl = ""
    # Query/key block of blockwise and splash attention (0 = the model's, 512). On 2 CPU cores
    # 64 is the fastest for the demo's 256-token rows: causal blocks above the diagonal are skipped.
    c.model.attention_block_size = 0
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


def wandb_config() -> ConfigDict:
    """Weights & Biases: the scalars of metrics.jsonl and the run's config, logged to one W&B run
    per run directory (resumed runs continue it). Needs `pip install -e '.[wandb]'`."""
    w = ConfigDict()
    w.project = ""  # W&B project; "" = off (wandb is then not imported).
    w.entity = ""  # W&B entity (team or user); "" = your default.
    w.name = ""  # Run name; "" = the run directory's last two parts (e.g. demo/midtrain).
    w.group = ""  # Run group (e.g. one recipe's stages); "" = none.
    w.mode = ""  # online | offline | disabled; "" = W&B's default (or the WANDB_MODE variable).
    return w


def default_workdir(stage: str, preset) -> str:
    """The run directory of a config given no --config.workdir: runs/<preset>/<stage>
    (runs/<stage> for configs without presets). The recipe's is runs/<preset>: its stages run in
    runs/<preset>/<stage>, where the stage configs' own defaults point too."""
    if stage == "recipe":
        return os.path.join("runs", preset or "demo")
    return os.path.join("runs", preset, stage) if preset else os.path.join("runs", stage)


def data_config() -> ConfigDict:
    """Fields of the text data used by the distillation stages (1 mid-training, 2 SFT)."""
    d = ConfigDict()
    d.train_files = ""  # JSONL / Parquet paths or globs (comma-separated) of training records.
    d.eval_files = ""  # Held-out problems with gold answers for the accuracy evaluation.
    # Canonical record fields -> names in the files.
    d.fields = ConfigDict({"problem": "problem", "solution": "solution", "answer": "answer",
                           "difficulty": "difficulty", "domain": "domain"})
    d.skip_malformed = False  # False: a malformed record stops with file:line; True: skip+count.
    d.seq_len = 256  # Tokens per row (packed rows for stage 1, padded rows for stage 2).
    d.global_batch_size = 16  # Rows per optimizer step, over all processes.
    d.num_epochs = 5  # Passes over the data (paper: 5): sets total_steps when that is -1. The
    # data itself repeats (reshuffled each epoch); the run stops after total_steps.
    d.shuffle = True  # Shuffle examples each epoch (seeded by `seed`).
    d.read_threads = 2  # grain worker threads for reading and tokenising.
    d.min_difficulty = -1.0  # SFT subset: keep difficulty >= this (-1 = no filter).
    d.domains = ""  # SFT subset: comma-separated domains to keep ("" = all).
    # SFT: kept examples of difficulty >= oversample_min_difficulty appear oversample_repeats
    # times per epoch (1 = off): the harder subset weighs more and the rest stays.
    d.oversample_min_difficulty = -1.0
    d.oversample_repeats = 1
    # SFT: a step's global_batch_size examples share rows (each whole, attending only to
    # itself, positions from 0) instead of one padded row each: the same training with less
    # padding; rows vary by step (a few shapes to compile). One process only (every host
    # would need the same row count); the attention must take segment ids (not cudnn).
    d.padding_free = False
    d.tokenizer = ConfigDict()
    d.tokenizer.kind = "hf"  # hf (tokenizer.json directory) | sentencepiece (.model file).
    d.tokenizer.path = ""  # "" = the tokenizer of the init checkpoint / HF dir, or the demo's.
    # Demo: generate the synthetic math corpus (and train its sentencepiece tokenizer) in the
    # workdir instead of reading files, so the demo needs no download.
    d.demo = False
    # Where the demo corpus is generated: "" = workdir/demo_data; DIR = DIR/<digest of the
    # settings below and the seed>, shared by every run with the same ones (the recipe sets
    # it for its stages, so the corpus is generated once per recipe, not once per stage).
    d.demo_dir = ""
    # Demo training problems. 30000 is about one epoch of stage 1 (600 steps x 16 packed rows):
    # the model learns the arithmetic instead of memorising answers. Measured in the recipe
    # (same held-out problems): 4000 problems (~7 epochs) gave stage 1 21.0% and the final model
    # 23.3%; 30000 gave 36.9% and 40.5%.
    d.demo_train = 30000
    # Demo held-out problems (disjoint from training). With 256, the recipe table's paired
    # standard error of a stage-to-stage change measured 0.9-1.4 points (a row's own: ~2.5).
    d.demo_heldout = 256
    # Demo "fresh" problems, in neither split where the kind has any left: the RL stage's
    # prompts, new to the policy as the paper's RL prompts are (on the training problems, which
    # stages 1-2 had just fitted, rollouts were 82-93% right at T 1.0 against 73% held-out).
    d.demo_fresh = 4096
    # Share of the demo's training solutions written in the shortcut style: every multi-digit
    # sum, difference or product in one go ("47 × 6 = 282.") instead of column by column, as a
    # strong teacher skips steps a small student cannot (demo_corpus.generate). 0 = all column.
    # The demo model imitates the mix and gets 0-12% of its shortcut answers right against
    # 65-96% of its column ones: a gap that rollout DPO and RL close by learning which of its
    # own styles pays (README, "Giving DPO and RL room: the shortcut corpus"). The demo presets
    # set 0.3 with "add" (`demo_data`); 0 here, for data built from this function alone.
    d.demo_shortcut_fraction = 0.0
    # "replace": those problems' column solutions are rewritten; "add": a shortcut copy is added
    # beside each (the teacher wrote both), so every column solution stays in the corpus.
    d.demo_shortcut_mode = "replace"
    # Levels of the demo corpus: 6, the hard tail included (level 6: a level-5 chain and then
    # one number more, the step the demo model learns last; demo_corpus.generate), or 5 (the
    # corpus before 2026-12-07). Held-out and RL's fresh problems are uniform over the levels;
    # the training problems (the teacher's solutions) follow the weights below.
    d.demo_max_level = 6
    # Relative weight of each level 1..demo_max_level among the training problems (() =
    # uniform). Level 6 at 0.1 (2% of the problems): a tail the teacher's verified solutions
    # rarely cover, as hard problems are in the paper's distillation data, while the RL prompts
    # and the held-out set have it at 1/6. Stage 1 then scores level 6 at 11% pass@1 against a
    # pass@4 of 37%: the room DPO and RL learn from (README, "The hard tail").
    d.demo_train_level_weights = (1.0, 1.0, 1.0, 1.0, 1.0, 0.1)
    d.demo_vocab_size = 1024  # Demo sentencepiece vocab (<= the demo model's vocab).
    d.eval_problems = 64  # Held-out problems scored by greedy decoding at each evaluation.
    # Generation budget per held-out problem (the demo's longest solution: 168 tokens).
    d.eval_max_new_tokens = 192
    return d


def demo_data(c: ConfigDict) -> ConfigDict:
    """The demo presets' data: the generated corpus (no download), with the hard tail (level 6
    rare among the teacher's solutions, data_config) and a teacher that skips steps: for 30% of
    the training problems it also writes the shortcut solution beside the column one ("add",
    every column solution stays). Every stage generates the same corpus from the recipe's
    seed; the held-out and RL's fresh problems keep the column style. The shortcut style is
    the gap DPO and RL learn from (README, "demo recipe")."""
    c.data.demo = True
    c.data.demo_shortcut_fraction = 0.3
    c.data.demo_shortcut_mode = "add"
    return c


def demo_model(c: ConfigDict) -> ConfigDict:
    """The demo presets' model and kernels, tuned for 2 CPU cores (BENCHMARKS.md, "demo train
    step"): the demo model; its 4 layers in a Python loop (no scan buffers); compute dtype
    "auto" over float32 master weights: bfloat16 where the hardware has bfloat16 units (AMX runs
    the demo step 2x faster than in float32, and the demo model's stage-1 loss was no worse),
    float32 on CPUs without them, where bfloat16 is emulated and 1.5x slower; blockwise
    attention in 64-token blocks, which skips the causal blocks above the diagonal of the
    192-256-token rows."""
    c.model.preset = "demo"
    c.model.scan_layers = False
    c.model.dtype = "auto"
    c.model.attention_impl = "blockwise"
    c.model.attention_block_size = 64
    return c


def phi4_mini_training(c: ConfigDict, *, seq_len: int, learning_rate: float) -> ConfigDict:
    """What every phi4_mini stage preset shares: the 3.8B model with bf16 matmuls over f32
    master weights and Adam state, per-layer remat, FSDP over all devices, a 2048-token LM-head
    chunk, the paper's global batch of 128, and evaluation left to configs/eval.py."""
    c.model.preset = "phi4_mini"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.seq_len = seq_len
    c.data.global_batch_size = 128
    c.data.tokenizer.kind = "hf"
    c.data.eval_problems = 0
    c.optim.learning_rate = learning_rate
    c.loss.chunk_size = 2048
    c.log_every_steps = 10
    c.checkpoint_every_steps = 500
    c.mesh.fsdp = -1
    return c


def mesh_and_rules(config: ConfigDict):
    """(device mesh, rules table as tuples) from `config.mesh` and `config.sharding_rules`
    (ConfigDicts store the table as lists: ["batch", ["data", "fsdp"]])."""
    rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                  for name, axes in config.sharding_rules)
    return make_mesh(dict(config.mesh)), rules
