r"""Reward-model training (InstructGPT stage 2): ranking loss over K ranked responses per prompt.

    python experiments/train_rm.py --config configs/rm.py:tiny --workdir /tmp/rm --config.seed 1
    python experiments/train_rm.py --config configs/rm.py:tiny --workdir /tmp/rm \
        --config.init.source=checkpoint --config.init.path=/tmp/sft
    python experiments/train_rm.py --config configs/rm.py:gpt2 --workdir runs/rm_gpt2 \
        --config.init.path=runs/sft_gpt2 --config.data.train=rankings.jsonl --config.data.eval=heldout.jsonl

Writes WORKDIR/config.json, metrics.jsonl, reward_norm.json, TensorBoard events, tokenizer/ and
checkpoints/ (whose metadata holds the reward normalisation PPO applies). Running the same command
again resumes; SIGTERM/SIGINT stop after the current step with a checkpoint. Unknown --config keys
are errors.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli  # noqa: E402
from rlhf_jax.trainers import rm  # noqa: E402

_CONFIG = cli.define_config_flag("configs/rm.py:tiny", "RM config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).", required=True)


def main(argv):
    cli.run_trainer(argv, rm.train, _CONFIG.value, _WORKDIR.value, "RM",
                    ("loss", "eval/loss", "eval/accuracy", "reward_norm/mean"))


if __name__ == "__main__":
    app.run(main)
