r"""Supervised fine-tuning (InstructGPT stage 1) or pretraining of a decoder LM.

    python experiments/train_sft.py --config configs/sft.py:tiny --workdir /tmp/sft --config.seed 1
    python experiments/train_sft.py --config configs/sft.py:tiny_pretrain --workdir /tmp/pretrain
    python experiments/train_sft.py --config configs/sft.py:gpt2 --workdir runs/sft_gpt2 \
        --config.init.path=/path/to/gpt2 --config.data.train=demos.jsonl --config.data.eval=heldout.jsonl

Writes WORKDIR/config.json, metrics.jsonl, samples.jsonl, TensorBoard events, tokenizer/ and
checkpoints/; running the same command again resumes from the newest checkpoint. SIGTERM/SIGINT
stop after the current step with a checkpoint. Unknown --config keys are errors.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli  # noqa: E402
from rlhf_jax.trainers import sft  # noqa: E402

_CONFIG = cli.define_config_flag("configs/sft.py:tiny", "SFT config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).", required=True)


def main(argv):
    config = _CONFIG.value
    cli.run_trainer(argv, sft.train, config, _WORKDIR.value, "Pretraining" if config.data.kind == "text" else "SFT",
                    ("loss", "eval/loss", "eval/accuracy"))


if __name__ == "__main__":
    app.run(main)
