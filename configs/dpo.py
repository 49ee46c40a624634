"""Stage 3: rollout DPO on (correct, incorrect) rollouts of the same problem, reference = the
stage-2 model (frozen; its log-probs are computed once before training).

  python -m phimr_jax.main --config=configs/dpo.py:demo --config.workdir=runs/demo/dpo \
      --config.init.checkpoint=runs/demo/sft
  python -m phimr_jax.main --config=configs/dpo.py:phi4_mini --config.workdir=RUN3 \
      --config.init.checkpoint=RUN2 --config.data.train_files=CURATED/dpo_pairs.jsonl
"""

from ml_collections import ConfigDict

from phimr_jax.train.config_base import (data_config, demo_data, demo_model, phi4_mini_training,
                                         train_config)


def get_config(arg="demo"):
    c = train_config("dpo")
    c.data = data_config()
    # Pair records: the curate stage's dpo_pairs.jsonl schema.
    # `prefix` (optional): a step pair, the shared first steps before chosen / rejected next
    # steps, scored on the step alone (phimr_jax/data/pairs.py).
    c.data.fields = ConfigDict({"problem": "problem", "chosen": "chosen", "rejected": "rejected",
                                "prefix": "prefix", "answer": "answer",
                                "difficulty": "difficulty", "domain": "domain"})
    c.data.eval_pairs = ""  # Held-out pairs for preference accuracy / margin at evaluations.
    c.data.num_epochs = 1  # Paper: 1 epoch.
    # Train on the first N pairs of the files only (0 = all). The reference log-probs are
    # computed once for every pair used, before training: a short run need not score them all.
    c.data.max_pairs = 0
    c.dpo = ConfigDict()
    c.dpo.beta = 0.1  # DPO temperature. Not published; 0.1 = the TRL / Tunix / EasyDeL default.
    c.dpo.label_smoothing = 0.0  # Conservative DPO: assumed rate of flipped preferences.
    # Weight of the chosen response's per-token NLL added to the DPO loss (RPO; 0 = plain DPO,
    # the paper's objective). Counters likelihood displacement (phimr_jax/stages/dpo.py).
    c.dpo.nll_weight = 0.0
    # Demo pairs (data.demo): "whole" = the correct solution vs its copy with one slip carried
    # through; "step" = only the slipped number after their shared prefix (a step pair);
    # "own" / "own_steps": below.
    c.dpo.demo_pairs = "whole"
    # "own" / "own_steps" demo pairs, from the initial (stage-2) policy's own rollouts of
    # training problems: a right vs a wrong rollout (the paper's rollout pairs) / its first
    # slips as step pairs (phimr_jax/stages/dpo.py, own_pairs).
    c.dpo.own_pairs = ConfigDict()
    # Which demo problems are rolled out: "train" (the teacher-solved ones stages 1-2 trained
    # on) or "fresh" (the RL prompt pool: problems with an answer and no teacher solution; a
    # rollout pair needs only the answer to label it).
    c.dpo.own_pairs.problems = "train"
    c.dpo.own_pairs.samples = 4  # completions per problem
    c.dpo.own_pairs.temperature = 1.0  # sampling temperature of those completions
    c.dpo.own_pairs.max_new_tokens = 192  # completion budget (the longest solution: 168 tokens)
    c.dpo.own_pairs.max_problems = 4096  # problems tried, at most, for data.max_pairs
    # Problems per sampler call (x samples rows). A call runs until its longest completion, so
    # calls of 256 rows waste fewer steps on stragglers (2 CPU cores, 1024 demo held-out rows:
    # 15.6 s in calls of 256 rows, 23.1 s in calls of 1024 even with prompts sorted by length).
    c.dpo.own_pairs.prompts_per_call = 64
    c.optim.warmup_fraction = 0.1
    c.optim.decay = "linear"
    if arg == "demo":
        # From the demo SFT run (--config.init.checkpoint). Pairs: the SFT model's own right vs
        # wrong rollouts (the paper's rollout pairs) of the RL pool's problems, where the hard
        # tail (level 6) has its full share, with an NLL term on the chosen side (RPO) against
        # likelihood displacement. Measured on the hard-tail corpus, seed 0 (README, "The hard
        # tail"): +0.6 +- 0.4 (level 6 23 -> 27%), from 320 pairs of 5120 rollouts at T 1.0.
        demo_model(c)  # Demo model, "auto" compute dtype, CPU-tuned kernels.
        demo_data(c)  # The generated corpus: hard tail, a step-skipping teacher.
        c.data.seq_len = 256  # The longest prompt + solution + <|end|>: 222 tokens.
        c.data.global_batch_size = 16  # rows = 8 pairs per step
        c.total_steps = 40
        # 40 steps x 8 pairs use 320; scoring 4000 pairs took 45 s. With demo_pairs=own, set
        # 320: sampling them from the SFT model (2000-5000 rollouts) takes 40-70 s.
        c.data.max_pairs = 320
        c.dpo.demo_pairs = "own"
        c.dpo.own_pairs.problems = "fresh"
        c.dpo.nll_weight = 1.0
        # 1/40 of the demo SFT LR, as the demo RL's. Measured from one stage-2 model of the
        # 30000-problem corpus (paired change of held-out pass@1): 5e-6 +0.3 +- 0.5; 2e-5
        # -1.6 +- 0.9; with an NLL term (RPO, nll_weight 1) 2e-5 -1.2 +- 0.9, 5e-5 (beta 0.5)
        # -4.1 +- 1.2; pairs from the stage-2 model's own rollouts -12.3 (2e-5) and -4.4 (RPO
        # 5e-5). README, "demo recipe". On the shortcut corpus (data.demo_shortcut_fraction
        # 0.3), own rollout pairs (demo_pairs=own) with RPO (nll_weight 1) at 5e-6: +4.7 +- 0.7
        # and +2.9 +- 0.7 ("replace", seeds 0, 1), +2.8 +- 0.7 and +3.4 +- 0.6 ("add"). On
        # the all-column corpus, the SFT model's own first slips as step pairs
        # (demo_pairs=own_steps): 1e-5 -0.5 +- 0.4, RPO 1e-5 -0.9 +- 0.5, RPO 3e-5 -2.8 +- 0.8,
        # RPO 1e-4 -16.4 +- 2.1. (Those corpora had no level 6; the generator's pairs are
        # demo_pairs=whole.) Hard tail + shortcut "add" 0.3 (the preset since 2026-12-07),
        # float32 compute, seed 0: +3.9 +- 0.8 (README, "demo recipe").
        c.optim.learning_rate = 5e-6
        c.log_every_steps = 10
        c.checkpoint_every_steps = 20
        c.eval_every_steps = 40  # Preference accuracy / margin once, at the end (~4 s each).
    elif arg == "phi4_mini":
        # The paper's stage 3: LR 5e-7, 1 epoch, 16K tokens. Batch not published: 64 pairs.
        phi4_mini_training(c, seq_len=16384, learning_rate=5e-7)
        c.total_steps = -1  # 1 epoch of the pairs.
    else:
        raise ValueError(f"unknown preset {arg!r}: demo | phi4_mini")
    return c
