"""The shared trainer: mesh and step loop (`trainer`), its initial model and sharded state
(`state`), Orbax run checkpoints (`checkpointing`) and their HF conversion (`convert`), the
optimizer (`optim`), chunked token losses (`losses`), memory estimates (`memory`), metrics and
progress (`metrics`) and the config fields every stage shares (`config_base`). Imports only
`model` and `data`."""
