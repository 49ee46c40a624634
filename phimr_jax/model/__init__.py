"""Phi-4-mini in Flax NNX, its configuration, sharding rules and HF conversion."""

from phimr_jax.model.cache import KVCache, StepCache
from phimr_jax.model.config import ConfigError, ModelConfig, preset
from phimr_jax.model.hf_io import CheckpointError, load_hf, save_hf
from phimr_jax.model.phi3 import Phi3ForCausalLM, abstract_model, init_model, param_count

__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "preset", "Phi3ForCausalLM", "KVCache",
           "StepCache", "abstract_model", "init_model", "param_count", "load_hf", "save_hf"]
