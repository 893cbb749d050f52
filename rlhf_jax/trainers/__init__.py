"""Trainers, one per stage: `sft` (also pretraining), `rm` (reward model), `ppo` (the RL stage,
every algorithm; its config checks and settings in `rl_config`, the iteration itself in
`rlhf_jax.algorithms`). They share, and never import each other: `loop` (the one host loop),
`state` (train state and jitted step of single-model stages) and `setup` (run start, checks)."""
