"""The compute dtype "auto": bfloat16 where the hardware multiplies it natively, float32 on
CPUs where XLA emulates it (BENCHMARKS.md, "Session 18")."""

from __future__ import annotations

from typing import Optional

from phimr_jax.model.config import dtype_name

# /proc/cpuinfo flags of x86 CPUs whose bfloat16 dot products run natively (AMX, AVX512-BF16).
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bfloat16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16), read from
    `cpuinfo`'s flags; False where that file cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_compute_dtype(dtype: str, backend: Optional[str] = None,
                          cpuinfo: str = "/proc/cpuinfo") -> str:
    """A config's compute dtype with "auto" resolved for the hardware the run is on: bfloat16
    on accelerators and on CPUs with bfloat16 units, float32 on other CPUs. There XLA emulates
    bfloat16 (a convert to float32 around every op and matmul): on a 2-core AVX2 EPYC the demo
    train step took 0.92 s in bfloat16 and 0.63 s in float32 (BENCHMARKS.md), while on an AMX
    Xeon bfloat16 ran the same step 2x faster. Other names pass through unchanged."""
    if dtype != "auto":
        return dtype_name(dtype)
    if backend is None:
        import jax
        backend = jax.default_backend()
    if backend != "cpu" or cpu_has_bfloat16_units(cpuinfo):
        return "bfloat16"
    return "float32"
