"""The recipe's stages, one module each, on the shared trainer (`phimr_jax.train`): `curate`
(teacher rollouts -> verified datasets), `midtrain` (stage 1) and `sft` (stage 2) with their
shared `distill` helpers, `dpo` (stage 3), `rl` (stage 4, a subpackage) and `recipe` (all four
in order, evaluated on the same held-out problems)."""
