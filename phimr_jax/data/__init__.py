"""Data pipelines (grain): sources, tokenizers, packing. Arrives with the trainer (issue 3)."""
