"""The RL algorithm family on the one iteration: each advantage estimator against a NumPy reference
on a ragged batch, DAPO's group filter, the group batching, config errors, and every algorithm of
the catalog learning the emit-token-3 rule reward, sharded over 8 devices and resumed exactly.

Compilation dominates on CPU: the tiny config with `fast_compile` and the session's persistent
compilation cache (tests/conftest.py), few iterations.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import algorithms, generation
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.algorithms.rollout import estimate_advantages, group_keep
from rlhf_jax.trainers import ppo
from test_ppo import DETERMINISTIC_KEYS, one_device_mesh, run_iterations, tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")

# a ragged batch of 2 groups of 3: lengths 1..4, one row without any response token is avoided
# (the generator always emits at least one token)
MASK = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
SCORES = np.array([1.0, 0.0, 2.0, 3.0, 3.0, 3.0], np.float32)  # group 1 has equal rewards
LOGP = -np.linspace(0.5, 2.0, 24, dtype=np.float32).reshape(6, 4)
REF = LOGP - np.linspace(-0.3, 0.4, 24, dtype=np.float32).reshape(6, 4)
BETA = 0.1


def settings(advantage, **fields):
    sampling = generation.SamplingConfig(max_new_tokens=4)
    return algorithms.RLSettings(sampling=sampling, advantage=advantage, critic="none", group_size=3, **fields)


def seq_kl(mask=MASK):
    return np.sum((LOGP - REF) * mask, axis=1)


def returns_reference(token_rewards, mask, gamma=1.0):
    """Reverse cumulative sum of rewards on valid tokens (reward-to-go), 0 on padding."""
    out = np.zeros_like(token_rewards)
    for b in range(token_rewards.shape[0]):
        running = 0.0
        for t in reversed(range(token_rewards.shape[1])):
            if mask[b, t]:
                running = token_rewards[b, t] + gamma * running
                out[b, t] = running
    return out


def shaped_rewards(scores):
    """-β·k1 per valid token, the score added at the last valid token (InstructGPT shaping)."""
    rewards = -BETA * (LOGP - REF) * MASK
    last = MASK.sum(1) - 1
    rewards[np.arange(6), last] += scores
    return rewards


def advantages_of(advantage, baseline=None, **fields):
    adv, values, returns, value_mask = estimate_advantages(
        settings(advantage, **fields), jnp.asarray(SCORES), jnp.asarray(LOGP * MASK), jnp.asarray(REF * MASK),
        None, jnp.asarray(MASK), jnp.float32(BETA), baseline)
    np.testing.assert_array_equal(np.asarray(values), 0.0)  # no critic
    np.testing.assert_allclose(np.asarray(returns), np.asarray(adv))
    return np.asarray(adv)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_advantage_is_the_group_z_score_on_every_token(kl_in):
    outcome = SCORES - (BETA * seq_kl() if kl_in == "reward" else 0.0)
    groups = outcome.reshape(2, 3)
    z = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(advantages_of("grpo", kl_in=kl_in), z.reshape(6, 1) * MASK, rtol=1e-5, atol=1e-5)


def test_dr_grpo_and_rloo_baselines():
    outcome = (SCORES - BETA * seq_kl()).reshape(2, 3)
    dr = outcome - outcome.mean(1, keepdims=True)
    loo = outcome - (outcome.sum(1, keepdims=True) - outcome) / 2
    np.testing.assert_allclose(advantages_of("dr_grpo"), dr.reshape(6, 1) * MASK, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages_of("rloo"), loo.reshape(6, 1) * MASK, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_remax_returns_of_shaped_rewards():
    np.testing.assert_allclose(advantages_of("reinforce_pp"), returns_reference(shaped_rewards(SCORES), MASK),
                               rtol=1e-5, atol=1e-5)
    centred = (SCORES.reshape(2, 3) - SCORES.reshape(2, 3).mean(1, keepdims=True)).reshape(6)
    np.testing.assert_allclose(advantages_of("reinforce_pp_baseline"),
                               returns_reference(shaped_rewards(centred), MASK), rtol=1e-5, atol=1e-5)
    greedy = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 4.0], np.float32)
    expected = (returns_reference(shaped_rewards(SCORES), MASK) - greedy[:, None]) * MASK
    np.testing.assert_allclose(advantages_of("remax", baseline=jnp.asarray(greedy)), expected, rtol=1e-5, atol=1e-5)


def test_dapo_group_filter_drops_groups_of_equal_rewards():
    keep = np.asarray(group_keep(settings("grpo", filter_groups=True), jnp.asarray(SCORES)))
    np.testing.assert_array_equal(keep, [True, True, True, False, False, False])
    assert np.all(np.asarray(group_keep(settings("grpo"), jnp.asarray(SCORES))))  # off: all kept


def test_settings_refuse_inconsistent_choices():
    sampling = generation.SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"advantage='grpo' needs group_size >= 2"):
        algorithms.RLSettings(sampling=sampling, advantage="grpo", critic="none", group_size=1)
    with pytest.raises(ValueError, match=r"advantage='gae' with critic='none'"):
        algorithms.RLSettings(sampling=sampling, advantage="gae", critic="none")
    with pytest.raises(ValueError, match=r"loss_agg_mode='token-sum'"):
        algorithms.RLSettings(sampling=sampling, loss_agg_mode="token-sum")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.algorithm.name='grpoo' \(allowed: 'ppo', 'ppo_penalty', 'grpo'"):
        ppo.validate_config(tiny_config(**{"algorithm.name": "grpoo"}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.algorithm.group_size=1: rloo compares responses"):
        ppo.validate_config(tiny_config(**{"algorithm.name": "rloo", "algorithm.group_size": 1}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.rollout.batch_size=16 must be a multiple of "
                                         r"config.algorithm.group_size=3"):
        ppo.validate_config(tiny_config(**{"algorithm.name": "grpo", "algorithm.group_size": 3}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.algorithm.dual_clip=0.5: need > 1"):
        ppo.validate_config(tiny_config(**{"algorithm.dual_clip": 0.5}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.algorithm.kl_in='both' \(allowed: '' = the algorithm's"):
        ppo.validate_config(tiny_config(**{"algorithm.kl_in": "both"}), (1, 1, 1))


def test_config_preset_names_the_algorithm():
    from configs import ppo as ppo_configs

    assert ppo_configs.get_config("tiny,dapo").algorithm.name == "dapo"
    assert ppo_configs.get_config("tiny").algorithm.name == "ppo"
    with pytest.raises(ValueError, match=r"configs/ppo.py: unknown algorithm 'grpoo' \(allowed: ppo, ppo_penalty"):
        ppo_configs.get_config("tiny,grpoo")


def test_settings_follow_the_catalog_and_the_overrides():
    grpo = ppo.settings_from_config(tiny_config(**{"algorithm.name": "grpo"}))
    assert (grpo.advantage, grpo.critic, grpo.kl_in, grpo.loss_agg_mode, grpo.group_size, grpo.whiten_advantages) == (
        "grpo", "none", "loss", "seq-mean-token-mean", 4, False)
    assert ppo.settings_from_config(tiny_config(**{"algorithm.name": "grpo", "algorithm.kl_in": "reward"})).kl_in == \
        "reward"
    dapo = ppo.settings_from_config(tiny_config(**{"algorithm.name": "dapo"}))
    assert dapo.clip_eps_high == 0.28 and dapo.filter_groups and dict(dapo.rules)["overlong"] == (("buffer", 4),
                                                                                                 ("weight", 1.0))
    shared = ppo.settings_from_config(tiny_config(**{"critic.type": "sequence"}))
    assert (shared.advantage, shared.critic, shared.whiten_advantages) == ("sequence", "separate", True)
    assert ppo.settings_from_config(tiny_config(**{"algorithm.name": "reinforce_pp"})).whiten_advantages


def test_group_batches_repeat_each_prompt_in_place():
    config = tiny_config(**{"algorithm.name": "grpo"})
    prompts, _ = ppo.make_data(config, "unused", group_size=4)
    batch = next(ppo.iteration_batches(prompts, None, group_size=4))["prompts"]
    assert batch["prompt_ids"].shape == (16, 8)  # rollout.batch_size responses = 4 prompts x 4
    for key in ("prompt_ids", "prompt_mask", "index"):
        grouped = batch[key].reshape(4, 4, *batch[key].shape[1:])
        np.testing.assert_array_equal(grouped, np.repeat(grouped[:, :1], 4, axis=1))
    assert len(set(batch["index"].tolist())) == 4


# ----------------------------------------------------------------------------------------------
# Every algorithm learns, is sharded like PPO and resumes exactly
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(algorithms.ALGORITHMS))
def learned(request):
    """16 iterations of the tiny config with `request.param` on one device: (name, rows, state, step)."""
    return (request.param, *run_iterations(tiny_config(**{"algorithm.name": request.param}), one_device_mesh(), 16))


def test_every_algorithm_learns_the_emit_token_reward(learned):
    """Reward = number of token-3s in an 8-token response; a random policy emits ~0.13. Each
    algorithm raises the batch mean by 0.5 tokens within 16 iterations (ReMax, whose greedy
    baseline is close to its samples at first, by 0.15), with finite losses and its own diagnostics."""
    name, rows, state, step_fn = learned
    curve = np.array([r["reward/mean"] for r in rows])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows), name
    assert curve[-4:].mean() > curve[:4].mean() + (0.15 if name == "remax" else 0.5), curve
    assert rows[-1]["nonfinite_steps"] == 0 and step_fn._cache_size() == 1
    algorithm = algorithms.ALGORITHMS[name]
    assert ("group/zero_std_fraction" in rows[-1]) == algorithm.grouped
    assert ("value/loss" in rows[-1]) == (algorithm.critic != "none")
    assert ("kl_loss" in rows[-1]) == (algorithm.kl_in == "loss")
    if name == "ppo_penalty":  # β_pen follows the doubling / halving rule of the KL measured each update
        betas = [r["penalty_coef"] for r in rows]
        for before, after, row in zip(betas, betas[1:], rows):
            target = 0.01
            expected = before / 2 if row["policy/kl"] < target / 1.5 else before * 2 if row["policy/kl"] > 1.5 * target \
                else before
            assert after == pytest.approx(expected, rel=1e-6)
    if name == "remax":
        assert "reward/greedy" in rows[-1]


def test_sharded_run_matches_one_device_and_resumes_exactly(learned, tmp_path):
    """The trainer on data=2, fsdp=2, tensor=2 (groups of consecutive rows straddle devices): 2
    iterations, stop, 1 more from the checkpoint == 3 straight, bit for bit (whole state incl.
    β_pen, metrics); and its first two iterations (sampling, scoring, one update, sampling again)
    equal the one-device run's to float32 tolerance. The sequence KL after one update is a ~1e-2
    sum of eight log-prob differences of ~4 nats each, and Adam's first step is lr·sign(g) per
    parameter, so parameters whose gradient is rounding-level move by ±lr depending on the
    reduction order: KL terms are compared to 5e-4 absolute; the group algorithms' losses are ~1e-2 means of O(1) terms whose
    advantages sum to 0 per group (1e-5 absolute); the rest to 1e-4 relative. (Later iterations
    are not compared across meshes: in this tiny setup every GRPO group of iteration 3 has equal
    rewards, so the policy gradient is rounding-level and Adam turns it into lr-sized steps of
    arbitrary sign; the trajectories then part for a reason that is not sharding.)"""
    name, reference, _, _ = learned
    config = lambda steps: tiny_config(num_steps=steps, **{  # noqa: E731
        "algorithm.name": name, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    ppo.train(config(2), str(tmp_path / "split"))
    resumed = ppo.train(config(3), str(tmp_path / "split"))
    straight = ppo.train(config(3), str(tmp_path / "straight"))
    assert len(straight.state.actor["layers"]["attn"]["q"]["kernel"].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), jax.device_get(straight.state))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    rows = strip(metrics_lib.read_metrics(tmp_path / "straight"))
    assert strip(metrics_lib.read_metrics(tmp_path / "split")) == rows
    keys = [k for k in (*DETERMINISTIC_KEYS, "kl_loss", "group/zero_std_fraction", "penalty_coef") if k in rows[0]]
    for one, many in zip(reference[:2], rows[:2]):
        for key in keys:
            atol = {"kl": 5e-4, "kl_loss": 5e-4, "policy/approx_kl": 5e-4, "loss": 1e-5, "policy/loss": 1e-5}.get(key, 1e-6)
            np.testing.assert_allclose(many[key], one[key], rtol=1e-4, atol=atol, err_msg=key)
    if name == "ppo_penalty":
        assert resumed.state.penalty_coef is not None
