"""Over-optimisation study: PPO at several KL coefficients against one reward model (Gao et al. 2022).

    python experiments/run_pipeline.py --workdir /tmp/rlhf               # once: pretrain, SFT, RM, ...
    python experiments/sweep.py --workdir /tmp/rlhf --kl_coefs 0.01,0.05,0.2
    python experiments/sweep.py --workdir /tmp/rlhf --kl_coefs 0,0.02 --set ppo.num_steps=200 --name long

Reuses the finished task / pretrain / SFT / rankings / RM stages of a pipeline workdir and runs
PPO + evaluation once per KL coefficient under DIR/sweep/<name>/kl_<coef>/ (resumable like the
pipeline). `--set key=value` overrides any field of the pipeline config (ppo.*, eval.*, seed)
for every run. Writes DIR/sweep/<name>/sweep.md, sweep.csv and overoptimization.png: the gold
score (what we want) and the RM score (what PPO maximises) against the KL to the SFT policy.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

from rlhf_jax import cli, pipeline  # noqa: E402
from rlhf_jax.trainers import setup  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline workdir (experiments/run_pipeline.py).", required=True)
_KL_COEFS = flags.DEFINE_list("kl_coefs", ["0.01", "0.05", "0.2"], "KL coefficients, comma-separated.")
_SET = flags.DEFINE_multi_string("set", [], "Override a pipeline config field for every run: key=value "
                                 "(e.g. ppo.num_steps=200); repeatable.")
_NAME = flags.DEFINE_string("name", "", "Sub-directory of DIR/sweep for this sweep (default: 'base', or "
                            "the --set overrides themselves, e.g. 'ppo.num_steps=200').")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    try:
        kl_coefs = [float(v) for v in _KL_COEFS.value]
    except ValueError as err:
        raise app.UsageError(f"--kl_coefs must be numbers, got {_KL_COEFS.value}: {err}") from err
    try:
        with setup.one_line_errors():
            if setup.workdir_owner(_WORKDIR.value).stage != "pipeline":
                raise setup.WorkdirError(f"--workdir {_WORKDIR.value} is not a pipeline directory "
                                         "(experiments/run_pipeline.py); nothing was changed")
            result = pipeline.run_sweep(_WORKDIR.value, kl_coefs, _SET.value, name=_NAME.value)
    except pipeline.StageInterrupted as stop:
        print(stop)
        sys.exit(setup.EXIT_PREEMPTED)
    print(result.table)
    print(f"Table: {result.directory / 'sweep.md'} (+ sweep.csv); plot: {result.directory / 'overoptimization.png'}")


if __name__ == "__main__":
    app.run(main)
