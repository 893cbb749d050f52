"""Trainers, one per stage: `sft` (also pretraining), `rm` (reward model), `ppo`; `common` holds
the shared optimizer, train state, jitted sharded step, run setup and training loop."""
