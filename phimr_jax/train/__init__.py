"""The shared trainer: mesh and sharded state (`trainer`), Orbax run checkpoints
(`checkpointing`) and their HF conversion (`convert`), the optimizer (`optim`), chunked token
losses (`losses`), memory estimates (`memory`), metrics and progress (`metrics`) and the config
fields every stage shares (`config_base`). Imports only `model` and `data`."""
