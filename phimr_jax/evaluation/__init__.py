"""Grading and evaluation: the Math-Verify reward pool (`rewards`, worker processes with a hard
kill), the paper's evaluation protocol (`harness`), sampling from a checkpoint or an HF
directory (`inference`) and the `generate` CLI stage (`generation`). Used by the stages; uses
the trainer's checkpoints, the model and the data."""
