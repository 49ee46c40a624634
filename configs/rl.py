"""Stage 4: RL with verifiable reward (GRPO by default, PPO with --config.rl.algorithm=ppo),
with the paper's three stabilisers. Rollouts come from our sampler on the parameters being
trained, in the same process.

  python -m phimr_jax.main --config=configs/rl.py:demo --config.workdir=runs/demo/rl \
      --config.init.checkpoint=runs/demo/dpo
  python -m phimr_jax.main --config=configs/rl.py:phi4_mini --config.workdir=RUN4 \
      --config.init.checkpoint=RUN3 --config.data.train_files=PROMPTS.jsonl
"""

from ml_collections import ConfigDict

from phimr_jax.train.config_base import (data_config, demo_data, demo_model, phi4_mini_training,
                                         train_config)


def get_config(arg="demo"):
    c = train_config("rl")
    c.data = data_config()
    # RL prompts: records with `problem` and a gold `answer` (JSONL / Parquet). data.seq_len is
    # the longest prompt + completion row; data.global_batch_size the rows per optimizer step
    # (the train batch, independent of the rollout batch below).
    c.data.num_epochs = 1  # Unused: RL runs for total_steps optimizer steps.
    c.rl = ConfigDict()
    c.rl.algorithm = "grpo"  # grpo | ppo (learned critic initialised from the policy, GAE).
    # RL starts from a trained policy: init.checkpoint, init.hf_dir, or else the "dpo" run beside
    # the workdir (runs/<preset>/dpo). True: with none of them, RL a random init (tests, checks).
    c.rl.allow_random_init = False
    c.rl.prompts_per_rollout = 16  # Prompts drawn per rollout batch.
    # G, samples per prompt. Not published; 8 is the TRL default and the smallest group whose
    # accuracy can pass the 50% filter with a few correct answers.
    c.rl.group_size = 8
    c.rl.max_new_tokens = 128  # Completion budget (a truncated completion gets reward -1).
    # Prompts per sampler call (x group_size rows; 0 = the whole rollout batch in one call). A
    # call runs until its longest completion: calls formed by prompt length waste fewer steps.
    c.rl.prompts_per_call = 0
    c.rl.truncated_is_wrong = True  # A completion cut at max_new_tokens gets -1 (else graded).
    c.rl.top_p = 1.0  # Nucleus sampling for rollouts (1.0: sample the policy itself).
    # Prompts with difficulty in [data.min_difficulty, rl.max_difficulty] (-1 = no bound).
    c.rl.max_difficulty = -1.0
    c.rl.question_suffix = ""  # Appended to each problem (the demo was trained without one).
    # mu: passes over each rollout batch. >1 reuses samples (the clipped ratio then matters);
    # 2 is a common GRPO choice (DeepSeekMath uses 1; TRL num_iterations default 1).
    c.rl.updates_per_rollout = 2
    # Pack several responses into each row of data.seq_len tokens (each its own segment and
    # positions; GRPO with token aggregation only): data.global_batch_size then counts packed
    # rows. False (and with PPO or sequence aggregation): one response per row, padded to
    # data.seq_len.
    c.rl.pack_responses = False
    c.rl.clip_eps = 0.2  # Ratio clip. Not published; 0.2 = TRL / Tunix / PPO default.
    # KL to the frozen initial policy (k3 estimator, exp(q) - q - 1). Not published; 0.0 is
    # TRL's default (verifiable rewards keep the policy honest; DAPO / Dr. GRPO drop it); Tunix
    # uses 0.04. > 0 holds a second copy of the weights for the reference.
    c.rl.kl_beta = 0.0
    # "token": every generated token weighs the same (DAPO; long answers are not diluted);
    # "sequence": each completion's mean, then the mean over completions (original GRPO).
    c.rl.aggregation = "token"
    c.rl.scale_rewards = True  # GRPO: divide by the group's std (+1e-4); False = Dr. GRPO.
    c.rl.max_empty_rollouts = 8  # Resample this often when filters drop a whole batch, then stop.
    c.rl.reward_workers = 0  # Math-Verify worker processes (0 = min(8, CPUs)).
    c.rl.reward_timeout_s = 5.0  # Per-completion grading limit (a hard kill; then reward -1).
    # Stabiliser 1, temperature annealing: linear start -> end over the first anneal_fraction
    # of the optimizer steps, then end (paper: 1.0 -> 0.6 over the first half).
    c.rl.temperature = ConfigDict({"anneal": True, "start": 1.0, "end": 0.6,
                                   "anneal_fraction": 0.5})
    # Stabiliser 2, prompt optimisation: keep a prompt only if its G responses have uniform
    # lengths (coefficient of variation std/mean <= max_length_cv), measured online per batch.
    c.rl.length_filter = True
    c.rl.max_length_cv = 0.5
    # Stabiliser 3, reward rebalancing: drop groups with accuracy > max_accuracy, keep every
    # positive response + as many random negatives; prompts whose accuracy <= hard_accuracy are
    # drawn `oversample` times as often afterwards.
    c.rl.rebalance = True
    c.rl.max_accuracy = 0.5
    c.rl.hard_accuracy = 0.25
    c.rl.oversample = 2.0
    c.rl.ppo = ConfigDict()
    c.rl.ppo.gamma = 1.0  # Discount (1: the only reward is at the end).
    c.rl.ppo.lam = 0.95  # GAE lambda.
    c.rl.ppo.value_coef = 0.5  # Weight of the value loss.
    c.rl.ppo.value_clip_eps = 0.2  # Clip of the value update around the rollout's values.
    c.optim.warmup_fraction = 0.0  # RL starts from a trained policy: no warmup by default.
    c.optim.decay = "constant"
    c.eval_every_steps = 0
    if arg == "demo":
        # From the demo DPO (or SFT) run: --config.init.checkpoint=runs/demo/dpo.
        demo_model(c)  # Demo model, "auto" compute dtype, CPU-tuned kernels.
        demo_data(c)  # The generated corpus: hard tail, a step-skipping teacher.
        # Every level: in the demo corpus each written step is one the model can learn and the
        # answers are two- or three-digit numbers, so a rewarded answer is right step by step
        # (held-out, stage 1, seed 0: 3 of 656 correct samples had a false step). The prompts
        # are the corpus' fresh problems, which stages 1-2 never trained on (rl.prompt_files;
        # stage 3's own-rollout pairs come from the same pool).
        c.rl.max_difficulty = -1.0
        c.rl.max_accuracy = 1.0  # Every group with a wrong answer teaches (the paper drops > 0.5).
        c.rl.prompts_per_rollout = 64  # 512 completions per rollout; 30-230 kept (mixed groups).
        c.rl.prompts_per_call = 32  # 256 rows per sampler call, as DPO's own rollouts.
        c.data.seq_len = 256  # Prompts <= 53 tokens + 192; the longest solution is 168 tokens.
        c.rl.max_new_tokens = 192
        # 40 packed rows per step: ~70 responses (prompt + completion ~135 of the rows' 256
        # tokens), where one response per row took 64 rows for 64 responses.
        c.rl.pack_responses = True
        c.data.global_batch_size = 40
        c.total_steps = 40
        # LR 2e-5 from sweeps on the demo corpus (paired change of held-out pass@1 over one
        # stage-3 model, seed 0; README, "demo recipe"): fresh prompts 2e-5 +1.4 +- 1.3, 5e-5
        # -0.7 +- 1.3; fresh prompts skewed to sums 2e-5 +0.1, 5e-5 -0.5, 1e-4 -10.8; the
        # training file's prompts 2e-5 -0.9. Above 2e-5 the kinds whose groups are all right
        # (no GRPO signal) drift more than the others gain. On the all-column corpus (from its
        # stage-3 model at 94.6%, seed 0): 2e-5 -2.0 +- 0.9, 5e-6 +0.2 +- 0.4; 128 prompts per
        # rollout and 128-row steps at 2e-5, 30 steps: -1.0 +- 0.7. On the shortcut corpus
        # (data.demo_shortcut_fraction 0.3), where the policy still picks the unreliable
        # one-go style on 7-21% of its multi-digit answers after DPO: 1e-5 +8.5 +- 1.1 and
        # +7.8 +- 1.2 ("replace", seeds 0, 1), +4.8 +- 0.9 and +5.9 +- 1.0 ("add"; README,
        # "Giving DPO and RL room"). From the seed-1 stage-3 model with stage 1 at 2e-3 (level
        # 4 at 79%, pass@4 89%): 2e-5 -2.4 +- 0.8, 5e-6 -0.8 +- 0.5 ("Stage 1 at LR 1e-3").
        # On the hard-tail corpus (level 6; README, "The hard tail"), 1e-5, seed 0: +1.8 +- 0.7,
        # level 6 27 -> 34% (its rollouts: 17% right at the first, 30-57% later). With the
        # step-skipping teacher (the preset since; float32): +5.0 +- 1.2 / +5.9 +- 1.0 /
        # +2.5 +- 0.7 (seeds 0 / 1 / 2), the one-go answers 9 / 9 / 6% -> 0 (README, "demo recipe").
        c.optim.learning_rate = 1e-5
        c.log_every_steps = 4
        c.checkpoint_every_steps = 20
        c.eval_every_steps = 20
        c.eval_at_start = True
    elif arg == "phi4_mini":
        # The paper's stage 4: 25K tokens, LR 5e-7. Rollout/train sizes are not published:
        # 64 prompts x 8 samples per rollout, 128 rows per optimizer step.
        phi4_mini_training(c, seq_len=25600, learning_rate=5e-7)
        c.data.global_batch_size = 128
        c.rl.prompts_per_rollout = 64
        c.rl.max_new_tokens = 24576  # 24K completion + up to 1K prompt tokens.
        c.rl.question_suffix = (" Please reason step by step, and put your final answer within "
                                "\\boxed{}.")
        c.total_steps = 1000
        c.checkpoint_every_steps = 50
    else:
        raise ValueError(f"unknown preset {arg!r}: demo | phi4_mini")
    return c
