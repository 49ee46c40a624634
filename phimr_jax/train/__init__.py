"""Run-level code: Orbax checkpoints and the convert / export / init stages (the shared
trainer arrives with issue 3)."""
