"""phimr_jax: the Phi-4-Mini-Reasoning training recipe in JAX.

Public API: `load_hf(path)` -> model, `save_hf(model, path)`, `generate(model, prompts, ...)`,
`math_reward(completions, answers)`, `ModelConfig`.
"""

from phimr_jax.model import (CheckpointError, ConfigError, ModelConfig, Phi3ForCausalLM, load_hf,
                             save_hf)
from phimr_jax.evaluation.rewards import RewardPool, math_reward
from phimr_jax.model.sampling import GenerateResult, generate

__version__ = "0.1.0"
__all__ = ["load_hf", "save_hf", "generate", "GenerateResult", "math_reward", "RewardPool",
           "ModelConfig", "Phi3ForCausalLM", "ConfigError", "CheckpointError"]
