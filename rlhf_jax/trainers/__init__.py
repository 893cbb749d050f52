"""Trainers, one per stage: `sft` (also pretraining), `rm` (reward model), `ppo` (the RL stage;
the iteration itself is `rlhf_jax.algorithms`). They share, and never import each other:
`loop` (the one host loop), `state` (train state and jitted step of single-model stages) and
`setup` (run start and config checks)."""
