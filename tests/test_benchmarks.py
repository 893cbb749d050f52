"""Quick checks of the benchmark scripts' own code paths (no timing): experiments/bench_ppo.py's
matched configs are valid RL configs for both algorithms, its Tunix settings carry every field
experiments/tunix_driver.py reads, and the summary's ratios are peer time / our time."""
from __future__ import annotations

import pathlib
import re
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import bench_ppo  # noqa: E402
from rlhf_jax.trainers import rl_config  # noqa: E402


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_bench_ppo_matched_configs_are_valid(algorithm, tmp_path):
    preset = bench_ppo.PRESETS["tiny"]
    _, reward_dir = bench_ppo.export_models(preset, str(tmp_path))
    config = bench_ppo.ours_config(algorithm, preset, reward_dir, iterations=3)
    rl_config.validate_config(config, (1, 1, 1))
    assert config.model.qkv_bias and config.model.d_model == preset["model"]["d_model"]
    assert (config.rollout.batch_size, config.rollout.max_new_tokens, config.rollout.eos_id) == (16, 8, -1)
    assert config.kl.coef == bench_ppo.KL_COEF and not config.kl.adaptive
    if algorithm == "grpo":
        assert config.algorithm.group_size == bench_ppo.GROUP_SIZE and config.rewards.rm_weight == 0
    else:
        assert config.reward.init.path == reward_dir and config.critic.init.source == "reward"


def test_tunix_settings_carry_what_the_driver_reads():
    settings = bench_ppo.tunix_settings("grpo", bench_ppo.PRESETS["tiny"], 3)
    driver = (EXPERIMENTS / "tunix_driver.py").read_text()
    read = set(re.findall(r'settings\["(\w+)"\]', driver))
    assert read and read <= set(settings), read - set(settings)
    assert set(re.findall(r'model\["(\w+)"\]', driver)) <= set(settings["model"])


def test_summary_ratios_are_peer_time_over_ours():
    runs = {"ours": [{"iteration": 1.0, "rollout": 0.4, "update": 0.5}, {"iteration": 3.0, "rollout": 1, "update": 2}],
            "tunix": [{"iteration": 4.0}, {"iteration": 8.0}]}
    row = bench_ppo.summarize(runs, batch=16)
    assert row["ours"]["iteration"] == 2.0 and row["ours"]["episodes_per_s"] == 8.0
    assert row["tunix"]["runs"] == [4.0, 8.0] and row["ours/tunix"] == 3.0
