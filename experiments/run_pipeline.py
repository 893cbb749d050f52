"""The whole InstructGPT recipe on the built-in task: pretrain -> SFT -> rankings -> RM -> PPO -> eval.

    python experiments/run_pipeline.py --workdir /tmp/rlhf            # configs/pipeline.py:tiny
    python experiments/run_pipeline.py --workdir /tmp/rlhf --config configs/pipeline.py:smoke
    python experiments/run_pipeline.py --workdir /tmp/rlhf --config.seed=1 --config.ppo.kl.coef=0.1
    python experiments/run_pipeline.py --workdir /tmp/rlvr --config.task=arithmetic   # verifiable rewards

Writes DIR/summary.json, DIR/report.md and DIR/*.png; each stage has its own sub-directory with
checkpoints. Running the same command again skips finished stages and resumes an interrupted one.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli, pipeline  # noqa: E402
from rlhf_jax.trainers.setup import EXIT_PREEMPTED, one_line_errors  # noqa: E402


def default_preset(argv: list[str]) -> str:
    """"arithmetic" when the command line asks for that task (its preset carries the recipe's stage
    settings), else "tiny"."""
    for i, arg in enumerate(argv):
        if arg == "--config.task=arithmetic" or (arg == "--config.task" and argv[i + 1:i + 2] == ["arithmetic"]):
            return "arithmetic"
    return "tiny"


_CONFIG = cli.define_config_flag(os.path.join(REPO, "configs", "pipeline.py") + ":" + default_preset(sys.argv[1:]),
                                 "Pipeline config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage, the report and the plots.",
                               required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    try:
        with one_line_errors():
            summary = pipeline.run_pipeline(_CONFIG.value, _WORKDIR.value)
    except pipeline.StageInterrupted as stop:
        print(stop)
        sys.exit(EXIT_PREEMPTED)
    print(json.dumps(summary, indent=2))
    algorithm = _CONFIG.value.algorithm
    print(f"Report: {os.path.join(_WORKDIR.value, '' if algorithm == 'ppo' else algorithm, 'report.md')}")


if __name__ == "__main__":
    app.run(main)
