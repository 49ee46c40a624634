"""Stage 4, RL with verifiable reward: `stage` (data, loss, the run; GRPO / PPO), `rollouts`
(sampling, grading, scoring a rollout batch), `objectives` (advantages and the clipped
policy / value losses) and `stabilisers` (the paper's three: temperature annealing, prompt
optimisation, reward rebalancing)."""
