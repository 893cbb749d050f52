r"""A controlled comparison of RL algorithms: same SFT model, same RM, same number of sampled
responses, one hidden gold judge (rlhf_jax.pipeline.compare).

    python experiments/compare_algorithms.py --workdir runs/compare --algorithms ppo,grpo,rloo --seeds 0,1,2
    python experiments/compare_algorithms.py --workdir runs/compare --algorithms ppo,grpo,dpo,online_dpo
    python experiments/compare_algorithms.py --workdir /tmp/c --algorithms grpo --seeds 0 \
        --config configs/pipeline.py:smoke --config.ppo.num_steps=4

Per seed, DIR/seed<N> is a pipeline workdir (experiments/run_pipeline.py): its stages up to the
RM run once, then each algorithm's RL stage and evaluation (PPO in ppo/ and eval/, the others in
<algorithm>/). Finished runs are reused, so the command resumes where it stopped. Writes
DIR/comparison.md, comparison.csv, gold_vs_samples.png and gold_vs_kl.png.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # repo root: configs/

from absl import app, flags  # noqa: E402

from rlhf_jax import cli  # noqa: E402
from rlhf_jax.pipeline import StageInterrupted, compare  # noqa: E402
from rlhf_jax.trainers import setup  # noqa: E402

_CONFIG = cli.define_config_flag(os.path.join(REPO, "configs", "pipeline.py") + ":tiny",
                                 "Pipeline config file[:preset] shared by every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the comparison (one pipeline dir per seed).",
                               required=True)
_ALGORITHMS = flags.DEFINE_list("algorithms", ["ppo", "grpo", "rloo"], "Algorithms, comma-separated "
                                "(rlhf_jax/algorithms/catalog.py, or the DPO variants of rlhf_jax/preference.py).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma-separated.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as err:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from err
    try:
        compare.check_algorithms(_ALGORITHMS.value)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    try:
        with setup.one_line_errors():
            setup.claim_workdir(_WORKDIR.value, "comparison")
            result = compare.run_comparison(_CONFIG.value, _WORKDIR.value, _ALGORITHMS.value, seeds)
    except StageInterrupted as stop:
        print(stop)
        sys.exit(setup.EXIT_PREEMPTED)
    print(result.table)
    print(f"Table: {result.directory / 'comparison.md'} (+ comparison.csv, gold_vs_samples.png, gold_vs_kl.png)")


if __name__ == "__main__":
    app.run(main)
