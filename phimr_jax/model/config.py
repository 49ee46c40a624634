"""Phi3-family model configuration: presets, validation, and HF `config.json` both ways.

`ModelConfig` is frozen and hashable so it can be a static argument of jitted functions.
`from_hf_dict` accepts both LongRoPE spellings found in the wild: the published
`rope_scaling` + top-level `rope_theta`/`partial_rotary_factor` form (transformers v4, the
Phi-4-mini `config.json`) and the transformers-v5 `rope_parameters` dict. `to_hf_dict` writes
the published form unless the config needs keys only the v5 form can carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax.numpy as jnp

# Phi-4-mini's published LongRoPE long factors (config.json, `rope_scaling.long_factor`).
PHI4_MINI_LONG_FACTOR = (
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023,
    4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372,
    10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807,
    22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66,
    32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A model configuration that phimr_jax cannot run (clear message, no deep stack)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Phi3-family decoder (HF `Phi3ForCausalLM`) plus the dtype policy."""

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 24
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # None: hidden_size // num_heads (HF's default).
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True  # Phi-4-mini ties; Phi-3 checkpoints carry lm_head.weight.
    sliding_window: Optional[int] = None  # Key index > query index - window (HF semantics).
    # Rotary embedding. rope_type "longrope" switches short/long factors per forward pass.
    rope_type: str = "longrope"  # "longrope" or "default" (plain RoPE, e.g. Phi-3-mini-4k).
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.75  # Rotate the first int(head_dim * f) dims only.
    short_factor: Optional[tuple] = None  # Length rotary_dim // 2; None: all ones.
    long_factor: Optional[tuple] = None  # Length rotary_dim // 2; None: all ones.
    original_max_position_embeddings: int = 4096  # Short/long switch point.
    max_position_embeddings: int = 131072
    rope_factor: Optional[float] = None  # Explicit `factor`; None: max / original (Phi3 rule).
    attention_factor: Optional[float] = None  # Explicit mscale; None: derived from the factor.
    # Special tokens (written back to config.json / generation_config.json).
    bos_token_id: Optional[int] = 199999
    eos_token_id: Any = 199999  # int or tuple of ints, as in the HF config.
    pad_token_id: Optional[int] = 199999
    stop_token_ids: tuple = (200020, 199999)  # <|end|>, <|endoftext|>: generation stops here.
    initializer_range: float = 0.02  # Std of the normal init of fresh weights (HF default).
    # Dtype policy: parameters are stored in param_dtype; matmuls run in dtype; norms and the
    # softmax always run in float32; logits come out in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Rematerialisation of the scanned decoder layer: "none", "full" or "dots" (save matmuls).
    remat_policy: str = "none"
    # Run the decoder layers with lax.scan (one compiled layer; the default) or a Python loop
    # (each layer compiled; faster for a few small layers on CPU). Not part of config.json.
    scan_layers: bool = True
    # Attention kernel (phimr_jax/model/attention.py): "xla" (reference, [T, T] scores),
    # "blockwise" (pure-JAX flash attention, any backend), "splash" (TPU), "cudnn" (GPU,
    # unpacked bf16/f16 rows; otherwise falls back to blockwise). Not part of config.json.
    attention_impl: str = "xla"
    attention_block_size: int = 512  # Query and key block of blockwise / splash attention.

    # ---------------------------------------------------------------- derived values
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (lossless; see from_dict)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise ConfigError with a plain message when the architecture is inconsistent."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ("longrope", "default"):
            raise ConfigError(f"rope_type must be 'longrope' or 'default', got {self.rope_type!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim * partial_rotary_factor) "
                              "must be even")
        want = self.rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(self, name)
            if factors is None:
                continue
            if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
                raise ConfigError(f"{name} must be a list of numbers, got {list(factors)!r}")
            if len(factors) != want:
                raise ConfigError(
                    f"{name} has {len(factors)} values but rotary_dim // 2 = {want} "
                    f"(head_dim {self.resolved_head_dim} x partial_rotary_factor "
                    f"{self.partial_rotary_factor}) are needed")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(_DTYPES)}, got "
                                  f"{getattr(self, name)!r}")
        if self.remat_policy not in ("none", "full", "dots"):
            raise ConfigError(f"remat_policy must be none|full|dots, got {self.remat_policy!r}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers must be a bool, got {self.scan_layers!r}")
        if self.attention_impl not in ("xla", "blockwise", "splash", "cudnn"):
            raise ConfigError("attention_impl must be xla|blockwise|splash|cudnn, got "
                              f"{self.attention_impl!r}")
        if not isinstance(self.attention_block_size, int) or self.attention_block_size <= 0:
            raise ConfigError("attention_block_size must be a positive integer, got "
                              f"{self.attention_block_size!r}")
        return self

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "ModelConfig":
        """Build from the dict of an HF Phi3 `config.json` (either RoPE spelling)."""
        model_type = hf.get("model_type")
        if model_type != "phi3":
            raise ConfigError(f"config.json has model_type {model_type!r}; phimr_jax supports "
                              "the Phi3 architecture (model_type 'phi3') only")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (Phi3 uses 'silu')")
        for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
            if hf.get(key):
                raise ConfigError(f"{key}=true is not supported: Phi-4-mini has no biases")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")

        # RoPE: v5 `rope_parameters` first, then the legacy `rope_scaling` dict.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters/rope_scaling must be a dict, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("su", "yarn"):  # Old Phi-3 spellings that HF maps to longrope.
            rope_type = "longrope"
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        # Phi3 exception in HF: a top-level original_max_position_embeddings takes priority.
        max_pos = hf.get("max_position_embeddings", 4096)
        orig_max = hf.get("original_max_position_embeddings",
                          rope.get("original_max_position_embeddings", max_pos))

        def factors(key):
            value = rope.get(key)
            if value is None:
                return None
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"rope {key} must be a list of numbers, got {value!r}")
            return tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                         else v for v in value)

        eos = hf.get("eos_token_id", 199999)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
        cfg = cls(
            stop_token_ids=eos_ids,  # from_hf_dir refines this from generation_config.json
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window"),
            rope_type=rope_type,
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            short_factor=factors("short_factor") if rope_type == "longrope" else None,
            long_factor=factors("long_factor") if rope_type == "longrope" else None,
            original_max_position_embeddings=int(orig_max),
            max_position_embeddings=int(max_pos),
            rope_factor=rope.get("factor"),
            attention_factor=rope.get("attention_factor"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        if rope_type == "longrope" and (cfg.short_factor is None or cfg.long_factor is None):
            raise ConfigError("rope type 'longrope' needs both short_factor and long_factor")
        return cfg.replace(**overrides).validate()

    def to_hf_dict(self, rope_format: str = "auto", torch_dtype: Optional[str] = None) -> dict:
        """The HF `config.json` dict. rope_format: "legacy" (published Phi-4-mini spelling,
        read by transformers v4 and v5), "v5" (`rope_parameters`), or "auto" (legacy unless an
        explicit `factor`/`attention_factor` needs the v5 spelling)."""
        if rope_format == "auto":
            explicit = self.rope_factor is not None or self.attention_factor is not None
            rope_format = "v5" if explicit else "legacy"
        if rope_format not in ("legacy", "v5"):
            raise ConfigError(f"rope_format must be auto|legacy|v5, got {rope_format!r}")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "torch_dtype": torch_dtype or self.param_dtype,
        }
        if self.head_dim is not None and self.head_dim != self.hidden_size // self.num_heads:
            hf["head_dim"] = self.head_dim
        rope: dict = {}
        if self.rope_type == "longrope":
            rope = {"short_factor": list(self.short_factor or [1.0] * (self.rotary_dim // 2)),
                    "long_factor": list(self.long_factor or [1.0] * (self.rotary_dim // 2))}
        if rope_format == "legacy":
            hf["rope_theta"] = self.rope_theta
            hf["partial_rotary_factor"] = self.partial_rotary_factor
            hf["rope_scaling"] = dict(type="longrope", **rope) if rope else None
        else:
            rope.update(rope_type=self.rope_type, rope_theta=self.rope_theta,
                        partial_rotary_factor=self.partial_rotary_factor)
            if self.rope_type == "longrope":
                rope["original_max_position_embeddings"] = self.original_max_position_embeddings
            if self.rope_factor is not None:
                rope["factor"] = self.rope_factor
            if self.attention_factor is not None:
                rope["attention_factor"] = self.attention_factor
            hf["rope_parameters"] = rope
        return hf

    @classmethod
    def from_hf_dir(cls, path: str, **overrides) -> "ModelConfig":
        """From `config.json`; stop tokens from `generation_config.json` when present (that is
        where Phi-4-mini lists <|end|>), else the config's eos ids."""
        hf = read_json(os.path.join(path, "config.json"), "config.json")
        gen_path = os.path.join(path, "generation_config.json")
        stops = read_json(gen_path, "generation_config.json").get("eos_token_id") \
            if os.path.isfile(gen_path) else None
        if stops is None:
            stops = hf.get("eos_token_id")
        if stops is not None and "stop_token_ids" not in overrides:
            overrides["stop_token_ids"] = tuple(stops) if isinstance(stops, list) else (stops,)
        return cls.from_hf_dict(hf, **overrides)

    def generation_config_dict(self) -> dict:
        """HF `generation_config.json`: stop on <|end|> as well as <|endoftext|>."""
        eos = list(dict.fromkeys(
            list(self.stop_token_ids)
            + (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
               else [self.eos_token_id] if self.eos_token_id is not None else [])))
        return {"bos_token_id": self.bos_token_id, "eos_token_id": eos,
                "pad_token_id": self.pad_token_id, "_from_model_config": False}


def read_json(path: str, what: str) -> dict:
    """Read a JSON file with errors that name the file instead of a decoder stack trace."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {what} at {path}: {e}") from None


# -------------------------------------------------------------------- presets
def phi4_mini(**overrides) -> ModelConfig:
    """Phi-4-mini (and -reasoning): the published config.json values, 3,836,021,760 params."""
    return ModelConfig(short_factor=(1.0,) * 48, long_factor=PHI4_MINI_LONG_FACTOR,
                       sliding_window=262144, **overrides).validate()


def _ramp(n: int, lo: float, hi: float) -> tuple:
    """Geometric factor ramp like Phi-4-mini's long factors, at any length."""
    return tuple(lo * (hi / lo) ** (i / max(n - 1, 1)) for i in range(n))


def tiny(**overrides) -> ModelConfig:
    """A tiny Phi-architecture model for tests: partial rotary 0.75, GQA 4/2, LongRoPE with
    non-trivial short AND long factors and a small original context (64) so both regimes are
    cheap to exercise."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, original_max_position_embeddings=64,
                max_position_embeddings=1024, short_factor=_ramp(6, 1.0, 1.5),
                long_factor=_ramp(6, 1.0, 12.0), stop_token_ids=(3, 2), bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    return ModelConfig(**base).validate()


def demo(**overrides) -> ModelConfig:
    """The demo recipe's model: small enough to train on 2 CPU cores in minutes, same
    architecture family (partial rotary 0.75, GQA 3:1, LongRoPE, tied embeddings). The vocab
    matches the demo sentencepiece tokenizer."""
    base = dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_layers=4,
                num_heads=6, num_kv_heads=2, original_max_position_embeddings=512,
                max_position_embeddings=8192, short_factor=(1.0,) * 12,
                long_factor=_ramp(12, 1.0, 16.0), stop_token_ids=(3, 2), bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    return ModelConfig(**base).validate()


PRESETS = {"phi4_mini": phi4_mini, "tiny": tiny, "demo": demo}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype-like ("bf16", jnp.bfloat16, "float32", ...)."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}
    name = aliases.get(str(dtype), None) or jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


__all__ = ["ModelConfig", "ConfigError", "phi4_mini", "tiny", "demo", "preset", "PRESETS",
           "read_json", "dtype_name"]
