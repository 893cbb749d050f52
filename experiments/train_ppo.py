r"""Train a policy with PPO / PPO-ptx (InstructGPT stage 3).

    python experiments/train_ppo.py --config configs/ppo.py:tiny --workdir /tmp/ppo
    python experiments/train_ppo.py --config configs/ppo.py:gpt2 --workdir runs/ppo_gpt2 \
        --config.actor.init.path=runs/sft_gpt2 --config.reward.init.path=runs/rm_gpt2

Writes WORKDIR/config.json, metrics.jsonl, TensorBoard events and checkpoints/; running the same
command again resumes from the newest checkpoint. `--config.num_steps=N` sets the run length.

Several processes (multi-host, or locally on CPU with gloo collectives): start one per process,
each seeing its own devices and reading its own slice of every batch, e.g. two on one machine:

    for i in 0 1; do JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1 \
      python experiments/train_ppo.py --workdir /tmp/ppo2 --config.num_steps=2 \
        --config.distributed.initialize=True --config.distributed.coordinator_address=127.0.0.1:12355 \
        --config.distributed.num_processes=2 --config.distributed.process_id=$i & done; wait

(tests/test_ppo.py::test_two_process_distributed_cpu_run, enabled with RLHF_JAX_MULTIPROCESS_TEST=1).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli  # noqa: E402
from rlhf_jax.trainers import ppo  # noqa: E402

_CONFIG = cli.define_config_flag("configs/ppo.py:tiny", "PPO config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).", required=True)


def main(argv):
    config = _CONFIG.value
    cli.run_trainer(argv, ppo.train, config, _WORKDIR.value, config.algorithm.name.upper(),
                    ("reward/mean", "kl", "kl_coef"))


if __name__ == "__main__":
    app.run(main)
