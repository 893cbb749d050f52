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
from rlhf_jax.trainers.setup import EXIT_PREEMPTED, one_line_errors  # noqa: E402

_CONFIG = cli.define_config_flag("configs/dpo.py:tiny", "DPO config file[:preset[,variant]].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    with one_line_errors():
        result = dpo.train(_CONFIG.value, _WORKDIR.value)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)
    if not result.last_row:
        print(f"Nothing to do: {_WORKDIR.value} is already at step {result.step} (raise --config.num_steps to continue).")
        return
    print(f"{_CONFIG.value.variant.upper()} finished at step {result.step}: " + ", ".join(
        f"{k}={result.last_row[k]:.4g}" for k in ("loss", "rewards/accuracy", "eval/loss", "eval/rewards/accuracy")
        if k in result.last_row))


if __name__ == "__main__":
    app.run(main)
