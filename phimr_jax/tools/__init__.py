"""Measurement tools: `bench` (CPU benchmarks: train step against its matmuls, sampler
against HF `generate`) and `bench_device` (the one-command GPU check)."""
