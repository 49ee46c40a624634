"""Measurement tools: `bench` (CPU benchmarks: the train step against its matmuls, the sampler
against HF `generate`) and `bench_device` (the one-command GPU check; its correctness section
is `device_checks`)."""
