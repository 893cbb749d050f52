"""Direct preference optimisation (DPO, cDPO, IPO, SimPO) from an SFT model on ranking data.

    python experiments/train_dpo.py --config configs/dpo.py:tiny --workdir /tmp/dpo
    python experiments/train_dpo.py --config configs/dpo.py:tiny,ipo --workdir /tmp/ipo \
        --config.init.source=checkpoint --config.init.path=/tmp/sft --config.data.train=rankings.jsonl
    python experiments/train_dpo.py --config configs/dpo.py:tiny --workdir /tmp/dpo_hh --config.data.kind=hh \
        --config.data.train=experiments/data/hh-rlhf/harmless-base-test.jsonl.gz --config.data.tokenizer=TOKENIZER_DIR

Writes WORKDIR/config.json, metrics.jsonl, TensorBoard events, tokenizer/ and checkpoints/ (the
policy, loadable with rlhf_jax.loading.load_model(WORKDIR, heads=("lm",))). Running the same
command again resumes; SIGTERM/SIGINT stop after the current step with a checkpoint. Unknown
--config keys are errors.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli  # noqa: E402
from rlhf_jax.trainers import dpo  # noqa: E402

_CONFIG = cli.define_config_flag("configs/dpo.py:tiny", "DPO config file[:preset[,variant]].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).", required=True)


def main(argv):
    config = _CONFIG.value
    cli.run_trainer(argv, dpo.train, config, _WORKDIR.value, config.variant.upper(),
                    ("loss", "rewards/accuracy", "eval/loss", "eval/rewards/accuracy"))


if __name__ == "__main__":
    app.run(main)
