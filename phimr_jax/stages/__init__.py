"""The recipe's stages on the shared trainer (`phimr_jax.train`), one module each (`curate`
keeps its record I/O and pairing pass in `curate_io`): `curate` (teacher rollouts -> verified
datasets), `midtrain` (stage 1) and `sft` (stage 2) with their shared `distill` helpers, `dpo`
(stage 3), `rl` (stage 4, a subpackage) and `recipe` (all four in order, evaluated on the same
held-out problems)."""
