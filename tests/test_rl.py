"""rlhf_jax.rl: hand-computed examples, NumPy loop references on ragged batches, jit/vmap parity."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl

B, T = 6, 7
SEEDS = range(15)


def ragged_mask(rng: np.random.Generator, batch=B, steps=T, allow_empty=False) -> np.ndarray:
    """Prefix masks; row 0 has length 1 and row 1 full length, the rest random (0 allowed if asked)."""
    low = 0 if allow_empty else 1
    lengths = rng.integers(low, steps + 1, size=batch)
    lengths[0], lengths[1] = 1, steps
    if allow_empty:
        lengths[2] = 0
    return (np.arange(steps)[None, :] < lengths[:, None]).astype(np.int32)


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# NumPy / Python-loop references
# ------------------------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """Row by row, backwards in time; a masked next position ends the episode (V = A = 0 there)."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                next_value, next_advantage = 0.0, 0.0
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            advantages[b, t] = delta + gamma * lam * next_advantage
            next_value, next_advantage = values[b, t], advantages[b, t]
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def kl_rewards_reference(scores, logprobs, ref_logprobs, mask, kl_coef, score_clip):
    rewards = np.zeros_like(logprobs, dtype=np.float64)
    for b in range(logprobs.shape[0]):
        valid = [t for t in range(logprobs.shape[1]) if mask[b, t]]
        for t in valid:
            rewards[b, t] = -kl_coef * (logprobs[b, t] - ref_logprobs[b, t])
        if valid:
            score = scores[b] if score_clip is None else min(max(scores[b], -score_clip), score_clip)
            rewards[b, valid[-1]] += score
    return rewards


# ------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------


def test_masked_stats_hand_example():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    # valid entries 1, 2, 4: mean = 7/3
    close(rl.masked_mean(x, mask), 7 / 3)
    # squared deviations (4/3)^2 + (1/3)^2 + (5/3)^2 = 16/9 + 1/9 + 25/9 = 42/9
    close(rl.masked_var(x, mask), (42 / 9) / 3)  # population: / N = 3 -> 14/9
    close(rl.masked_var(x, mask, unbiased=True), (42 / 9) / 2)  # Bessel: / (N - 1) = 2 -> 7/3
    # per row: row 0 -> mean 1.5, var ((0.5)^2 + (0.5)^2)/2 = 0.25; row 1 -> mean 4, var 0
    close(rl.masked_mean(x, mask, axis=-1), [1.5, 4.0])
    close(rl.masked_var(x, mask, axis=-1), [0.25, 0.0])
    close(rl.masked_sum(x, mask), 7.0)
    # an empty mask gives 0, not NaN
    close(rl.masked_mean(x, jnp.zeros_like(mask)), 0.0)
    close(rl.masked_var(x, jnp.zeros_like(mask), unbiased=True), 0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_stats_match_numpy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    valid = x[mask.astype(bool)]
    close(rl.masked_mean(x, mask), valid.mean())
    close(rl.masked_var(x, mask), valid.var())
    close(rl.masked_var(x, mask, unbiased=True), valid.var(ddof=1))
    for b in range(B):
        row = x[b][mask[b].astype(bool)]
        close(rl.masked_mean(x, mask, axis=-1)[b], row.mean())
        close(rl.masked_var(x, mask, axis=-1)[b], row.var())


def test_explained_variance_hand_example():
    mask = jnp.array([[1, 1, 1, 0]])
    returns = jnp.array([[0.0, 2.0, 4.0, 50.0]])
    # residual R - V = [-1, 0, 1]: var 2/3; var R = ((-2)^2 + 0 + 2^2)/3 = 8/3 -> 1 - (2/3)/(8/3) = 0.75
    close(rl.explained_variance(jnp.array([[1.0, 2.0, 3.0, -7.0]]), returns, mask), 0.75)
    close(rl.explained_variance(returns, returns, mask), 1.0)  # perfect critic
    close(rl.explained_variance(jnp.full((1, 4), 2.0), returns, mask), 0.0)  # predicts the mean
    assert np.isnan(rl.explained_variance(returns, jnp.ones((1, 4)), mask))  # Var[R] = 0


@pytest.mark.parametrize("seed", SEEDS)
def test_explained_variance_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    returns, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = ragged_mask(rng).astype(bool)
    expected = 1 - np.var(returns[mask] - values[mask]) / np.var(returns[mask])
    close(rl.explained_variance(values, returns, mask), expected, tol=1e-4)


# ------------------------------------------------------------------------------------------
# Whitening
# ------------------------------------------------------------------------------------------


def test_whiten_hand_example():
    x = jnp.array([[0.0, 4.0, 123.0]])
    mask = jnp.array([[1, 1, 0]])
    # mean 2, population var ((-2)^2 + 2^2)/2 = 4, std 2 -> [(0-2)/2, (4-2)/2] = [-1, 1]; pad -> 0
    close(rl.whiten(x, mask), [[-1.0, 1.0, 0.0]])
    # without the mean shift the mean is added back: [-1 + 2, 1 + 2] = [1, 3]
    close(rl.whiten(x, mask, shift_mean=False), [[1.0, 3.0, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten_matches_numpy_and_ignores_padding(seed):
    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.normal(size=(B, T))).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    valid = mask.astype(bool)
    expected = np.where(valid, (x - x[valid].mean()) / np.sqrt(x[valid].var() + 1e-8), 0.0)
    out = rl.whiten(x, mask)
    close(out, expected, tol=1e-4)
    close(rl.whiten(x, mask, shift_mean=False), np.where(valid, expected + x[valid].mean(), 0.0), tol=1e-4)
    # invariants: valid entries have mean 0 and variance 1
    close(np.asarray(out)[valid].mean(), 0.0, tol=1e-5)
    close(np.asarray(out)[valid].var(), 1.0, tol=1e-4)
    # padding is ignored exactly: garbage (huge, inf, nan) in padded slots changes nothing
    garbage = np.where(valid, x, rng.choice([1e6, -1e6, np.inf, np.nan], size=x.shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rl.whiten(garbage, mask)), np.asarray(out))


# ------------------------------------------------------------------------------------------
# KL estimators and KL-shaped rewards
# ------------------------------------------------------------------------------------------


def test_kl_estimators_hand_example():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    # log r = log(ref/p) = log 0.5 = -log 2
    close(rl.kl_k1(logp, ref), [math.log(2)])  # -log r
    close(rl.kl_k3(logp, ref), [(0.5 - 1) + math.log(2)])  # (r - 1) - log r
    close(rl.kl_k3(logp, ref, mask=jnp.array([0])), [0.0])


@pytest.mark.parametrize("seed", range(10))
def test_k1_k3_expectations_equal_exact_kl(seed):
    """Sum over the whole vocabulary weighted by p: E_p[k1] = E_p[k3] = KL(p || q) exactly; k3 >= 0."""
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(11), size=2)
    exact = np.sum(p * np.log(p / q))
    logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
    close(jnp.sum(p * rl.kl_k1(logp, logq)), exact, tol=1e-5)
    close(jnp.sum(p * rl.kl_k3(logp, logq)), exact, tol=1e-5)
    assert np.all(np.asarray(rl.kl_k3(logp, logq)) >= -1e-7)


def test_kl_penalized_rewards_hand_example():
    logprobs = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref_logprobs = jnp.array([[-1.5, -1.0, -9.0], [-0.5, -1.5, -0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    scores = jnp.array([2.0, -5.0])
    # row 0: -0.1*(−1+1.5) = -0.05 ; -0.1*(−2+1) = +0.1, + score 2 (inside ±3) at t=1 ; pad -> 0
    # row 1: -0.1*0 = 0 ; -0.1*(−0.5+1.5) = -0.1 ; -0.1*(−0.5−0) = +0.05, + clip(−5) = −3 at t=2
    expected = [[-0.05, 2.1, 0.0], [0.0, -0.1, 0.05 - 3.0]]
    close(rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.1, score_clip=3.0), expected)
    # no clip: row 1 keeps -5
    close(rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.1)[1, 2], 0.05 - 5.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_penalized_rewards_match_loop(seed):
    rng = np.random.default_rng(seed)
    logprobs, ref_logprobs = -rng.exponential(size=(2, B, T)).astype(np.float32)
    scores = (4 * rng.normal(size=B)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    kl_coef, score_clip = float(rng.uniform(0.01, 0.5)), [None, 2.0][seed % 2]
    out = rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, score_clip)
    close(out, kl_rewards_reference(scores, logprobs, ref_logprobs, mask, kl_coef, score_clip))
    assert np.all(np.asarray(out)[mask == 0] == 0)


def test_last_valid_onehot_handles_holes_and_empty_rows():
    mask = jnp.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    close(rl.last_valid_onehot(mask), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])


def test_first_valid_handles_holes_and_empty_rows():
    x = jnp.array([[5.0, 6.0, 7.0], [5.0, 6.0, 7.0], [5.0, 6.0, 7.0], [np.nan, 6.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]])
    close(rl.first_valid(x, mask), [5.0, 6.0, 0.0, 7.0])  # NaN before the first valid entry is not seen


def test_adaptive_kl_coef_hand_example():
    # KL 4.4 vs target 4: error 0.1 -> 0.1 * (1 + 0.1 * 256/10000) = 0.1 * 1.00256
    close(rl.adaptive_kl_coef(0.1, 4.4, 256, 4.0, 10000), 0.1 * 1.00256, tol=1e-7)
    # KL 6 vs 4: error 0.5 clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.0256) = 0.1 * 1.00512
    close(rl.adaptive_kl_coef(0.1, 6.0, 256, 4.0, 10000), 0.1 * 1.00512, tol=1e-7)
    # KL 1 vs 4: error -0.75 clipped to -0.2 -> 0.1 * (1 - 0.00512)
    close(rl.adaptive_kl_coef(0.1, 1.0, 256, 4.0, 10000), 0.1 * 0.99488, tol=1e-7)


@pytest.mark.parametrize("seed", range(10))
def test_adaptive_kl_coef_matches_formula(seed):
    rng = np.random.default_rng(seed)
    coef, kl, target = rng.uniform(0.01, 1.0), rng.uniform(0.0, 20.0), rng.uniform(0.5, 10.0)
    n_steps, horizon = int(rng.integers(1, 1024)), float(rng.uniform(1e3, 1e5))
    expected = coef * (1 + min(max(kl / target - 1, -0.2), 0.2) * n_steps / horizon)
    close(rl.adaptive_kl_coef(coef, kl, n_steps, target, horizon), expected, tol=1e-6)


# ------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------


def test_gae_hand_example():
    rewards = jnp.array([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = jnp.array([[0.5, 1.0, 1.5], [1.0, 1.0, 99.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    # gamma = 0.9, lam = 0.5, gamma*lam = 0.45; V after the last valid token = 0
    # row 0: t=2 delta = 2 + 0.9*0 - 1.5 = 0.5              A2 = 0.5
    #        t=1 delta = 0 + 0.9*1.5 - 1.0 = 0.35            A1 = 0.35 + 0.45*0.5   = 0.575
    #        t=0 delta = 1 + 0.9*1.0 - 0.5 = 1.4             A0 = 1.4 + 0.45*0.575  = 1.65875
    # row 1: t=1 delta = 2 + 0 - 1 = 1                       A1 = 1
    #        t=0 delta = 1 + 0.9*1 - 1 = 0.9                 A0 = 0.9 + 0.45*1      = 1.35
    advantages, returns = rl.gae(rewards, values, mask, 0.9, 0.5)
    close(advantages, [[1.65875, 0.575, 0.5], [1.35, 1.0, 0.0]])
    close(returns, [[1.65875 + 0.5, 0.575 + 1.0, 0.5 + 1.5], [1.35 + 1.0, 1.0 + 1.0, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    gamma, lam = float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.0, 1.0))
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = gae_reference(rewards, values, mask, gamma, lam)
    close(advantages, ref_advantages)
    close(returns, ref_returns)
    assert np.all(np.asarray(advantages)[mask == 0] == 0) and np.all(np.asarray(returns)[mask == 0] == 0)


@pytest.mark.parametrize("seed", range(10))
def test_gae_lambda_one_zero_values_is_discounted_return(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    gamma = 0.95
    advantages, returns = rl.gae(rewards, np.zeros_like(rewards), mask, gamma, 1.0)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            mc_return = sum(gamma ** (k - t) * rewards[b, k] for k in range(t, n))
            close(advantages[b, t], mc_return)
            close(returns[b, t], mc_return)


@pytest.mark.parametrize("seed", range(10))
def test_gae_lambda_zero_is_td_error(seed):
    rng = np.random.default_rng(seed)
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    gamma = 0.9
    advantages, _ = rl.gae(rewards, values, mask, gamma, 0.0)
    next_values = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((B, 1), np.float32)], axis=1)
    td_error = np.where(mask, rewards + gamma * next_values - values, 0.0)
    close(advantages, td_error)


def test_gae_gamma_lambda_one_telescopes():
    """gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t (the value terms telescope)."""
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    advantages, returns = rl.gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1)
    close(advantages, np.where(mask, reward_to_go - values, 0.0))
    close(returns, np.where(mask, reward_to_go, 0.0))


def test_gae_mask_with_hole_cuts_the_recursion():
    """A non-prefix mask is handled: each run of 1s is its own episode (loop reference agrees)."""
    rng = np.random.default_rng(3)
    rewards, values = rng.normal(size=(2, 2, 6)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]], np.int32)
    advantages, returns = rl.gae(rewards, values, mask, 0.9, 0.7)
    ref_advantages, ref_returns = gae_reference(rewards, values, mask, 0.9, 0.7)
    close(advantages, ref_advantages)
    close(returns, ref_returns)
    # the first segment of row 0 sees nothing of the second: A_1 = r_1 - V_1
    close(advantages[0, 1], rewards[0, 1] - values[0, 1])


def test_gae_ignores_padded_values():
    """Padded rewards/values (even NaN) do not leak into valid positions."""
    rng = np.random.default_rng(5)
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    clean = rl.gae(rewards, values, mask, 0.9, 0.95)
    dirty = rl.gae(np.where(mask, rewards, np.nan), np.where(mask, values, np.nan), mask, 0.9, 0.95)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------
# Discounted returns (REINFORCE++)
# ------------------------------------------------------------------------------------------


def returns_reference(rewards, mask, gamma):
    """Row by row, backwards; a masked position contributes nothing and ends the sum before it."""
    returns = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            running = rewards[b, t] + gamma * running if mask[b, t] else 0.0
            returns[b, t] = running
    return returns


def test_discounted_returns_hand_example():
    rewards = jnp.array([[1.0, 0.0, 2.0], [-1.0, 4.0, 99.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # gamma 0.5: row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5
    #            row 1: G1 = 4 (the padded 99 is not seen), G0 = -1 + 0.5*4 = 1 ; row 2 empty -> 0
    close(rl.discounted_returns(rewards, mask, 0.5), [[1.5, 1.0, 2.0], [1.0, 4.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("seed", range(10))
def test_discounted_returns_match_loop(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    gamma = float(rng.uniform(0.8, 1.0))
    out = rl.discounted_returns(np.where(mask, rewards, np.nan), mask, gamma)  # padding may be NaN
    close(out, returns_reference(rewards, mask, gamma))
    assert np.all(np.asarray(out)[mask == 0] == 0)
    # gamma = 1: the plain reverse cumulative sum of the valid rewards
    reward_to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1)
    close(rl.discounted_returns(rewards, mask, 1.0), np.where(mask, reward_to_go, 0.0))


# ------------------------------------------------------------------------------------------
# Group baselines (GRPO / Dr.GRPO / RLOO)
# ------------------------------------------------------------------------------------------


def group_advantages_reference(scores, group_size, estimator, eps=1e-6):
    """Plain Python per group: statistics.mean / statistics.stdev (sample std), leave-one-out loop."""
    import statistics

    out = []
    for start in range(0, len(scores), group_size):
        group = [float(x) for x in scores[start:start + group_size]]
        for i, r in enumerate(group):
            if len(group) == 1:
                out.append(0.0)
            elif estimator == "grpo":
                out.append((r - statistics.mean(group)) / (statistics.stdev(group) + eps))
            elif estimator == "dr_grpo":
                out.append(r - statistics.mean(group))
            else:
                others = group[:i] + group[i + 1:]
                out.append(r - sum(others) / len(others))
    return np.array(out)


def test_group_advantages_hand_example():
    scores = jnp.array([1.0, 0.0, 0.0, 0.0, 3.0, 5.0])
    # group_size 3: group 0 = [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3]
    #   sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3) = 0.57735
    #   grpo: [2/3, -1/3, -1/3] * sqrt(3) = [1.154701, -0.577350, -0.577350] (eps 1e-6 ignored at 1e-5)
    #   rloo: [1 - 0, 0 - 1/2, 0 - 1/2] = [1, -0.5, -0.5] = 3/2 * deviations
    # group 1 = [0, 3, 5]: mean 8/3, deviations [-8/3, 1/3, 7/3]
    #   sample var = (64/9 + 1/9 + 49/9) / 2 = 114/18 = 19/3, std = sqrt(19/3) = 2.516611
    #   rloo: [0 - 4, 3 - 5/2, 5 - 3/2] = [-4, 0.5, 3.5]
    s3, s19 = math.sqrt(3), math.sqrt(19 / 3)
    close(rl.group_advantages(scores, 3),
          [2 / 3 * s3, -1 / 3 * s3, -1 / 3 * s3, -8 / 3 / s19, 1 / 3 / s19, 7 / 3 / s19])
    close(rl.group_advantages(scores, 3, "dr_grpo"), [2 / 3, -1 / 3, -1 / 3, -8 / 3, 1 / 3, 7 / 3])
    close(rl.group_advantages(scores, 3, "rloo"), [1.0, -0.5, -0.5, -4.0, 0.5, 3.5])
    # group_size 2: pairs [1, 0], [0, 0], [3, 5]: sample std of a pair = |a - b| / sqrt(2)
    #   grpo [1, 0] -> (±0.5) / (1/sqrt 2) = ±0.7071 ; [0, 0] -> 0 ; [3, 5] -> ∓0.7071
    #   rloo of a pair: r - the other one
    h = math.sqrt(0.5)
    close(rl.group_advantages(scores, 2), [h, -h, 0.0, 0.0, -h, h])
    close(rl.group_advantages(scores, 2, "rloo"), [1.0, -1.0, 0.0, 0.0, -2.0, 2.0])
    assert rl.group_advantages(scores, 3).dtype == jnp.float32


@pytest.mark.parametrize("estimator", rl.GROUP_ESTIMATORS)
def test_group_advantages_equal_scores_and_size_one(estimator):
    # 1.1 and 0.1 are not exact in binary: in fp32 a plain mean of [1.1] * 3 is 1.1 - 1.19e-7, which
    # GRPO would turn into -1.19e-7 / (std 1.4e-7 + eps) = -0.10 instead of 0; the mean taken
    # relative to the group's first score gives exactly 0 for a group of equal scores
    scores = jnp.array([1.1, 1.1, 1.1, 0.1, 0.1, 0.1, 2.0, 2.0, 2.0], jnp.float32)
    out = np.asarray(rl.group_advantages(scores, 3, estimator))
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)
    # size-1 groups: no baseline, 0 (not NaN from ddof 1, not the raw score)
    out = np.asarray(rl.group_advantages(jnp.array([3.0, -1.0, 0.5]), 1, estimator))
    assert np.all(out == 0.0)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("estimator", rl.GROUP_ESTIMATORS)
def test_group_advantages_match_reference(seed, estimator):
    rng = np.random.default_rng(seed)
    group_size = [2, 3, 4, 8][seed % 4]
    scores = rng.normal(size=4 * group_size).astype(np.float32)
    scores[:group_size] = np.round(scores[:group_size])  # binary-like rewards, possibly all equal
    close(rl.group_advantages(scores, group_size, estimator), group_advantages_reference(scores, group_size, estimator),
          tol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_group_advantages_relations(seed):
    """rloo = G/(G-1) dr_grpo; dr_grpo = grpo * (std + eps); each group's dr_grpo sums to 0."""
    rng = np.random.default_rng(seed)
    g = 5
    scores = rng.normal(size=3 * g).astype(np.float32)
    dr = np.asarray(rl.group_advantages(scores, g, "dr_grpo"))
    close(rl.group_advantages(scores, g, "rloo"), g / (g - 1) * dr)
    stds = np.repeat(scores.reshape(-1, g).std(axis=1, ddof=1), g)
    close(np.asarray(rl.group_advantages(scores, g, "grpo")) * (stds + 1e-6), dr)
    close(dr.reshape(-1, g).sum(axis=1), np.zeros(3))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="7.*3|3.*7"):
        rl.group_advantages(jnp.zeros(7), 3)
    with pytest.raises(ValueError, match="grpo.*dr_grpo.*rloo"):
        rl.group_advantages(jnp.zeros(6), 3, estimator="ppo")


def test_ppo_penalty_coef_hand_example():
    # target 0.01: below 0.01/1.5 = 0.00667 -> halve; above 0.015 -> double; in between -> keep
    close(rl.ppo_penalty_coef(0.2, 0.005, 0.01), 0.1)
    close(rl.ppo_penalty_coef(0.2, 0.02, 0.01), 0.4)
    close(rl.ppo_penalty_coef(0.2, 0.01, 0.01), 0.2)
    close(rl.ppo_penalty_coef(0.2, 0.0149, 0.01), 0.2)
    close(rl.ppo_penalty_coef(0.2, 0.0067, 0.01), 0.2)
    # traceable: jit with every argument traced
    close(jax.jit(rl.ppo_penalty_coef)(0.2, 0.02, 0.01), 0.4)


# ------------------------------------------------------------------------------------------
# Sequence-level critic variant
# ------------------------------------------------------------------------------------------


def test_sequence_level_helpers_hand_example():
    logprobs = jnp.array([[-1.0, -2.0, -3.0]])
    ref_logprobs = jnp.array([[-1.5, -1.0, -9.0]])
    mask = jnp.array([[1, 1, 0]])
    # R = 2 - 0.1 * ((−1+1.5) + (−2+1)) = 2 - 0.1 * (−0.5) = 2.05
    rewards = rl.sequence_kl_penalized_rewards(jnp.array([2.0]), logprobs, ref_logprobs, mask, 0.1)
    close(rewards, [2.05])
    # V(seq) = mean(0.5, 1.5) = 1.0 (the padded 7.0 is ignored); A = 2.05 - 1.0
    value = rl.sequence_values(jnp.array([[0.5, 1.5, 7.0]]), mask)
    close(value, [1.0])
    advantages, returns = rl.sequence_advantages(rewards, value)
    close(advantages, [1.05])
    close(returns, [2.05])


# ------------------------------------------------------------------------------------------
# jit / vmap parity
# ------------------------------------------------------------------------------------------


def _rl_cases(rng):
    x, y, lp, ref = rng.normal(size=(4, B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    scores = rng.normal(size=B).astype(np.float32)
    return {
        "masked_mean": (lambda x, m: rl.masked_mean(x, m), (x, mask)),
        "masked_mean_rows": (lambda x, m: rl.masked_mean(x, m, axis=-1), (x, mask)),
        "masked_var": (lambda x, m: rl.masked_var(x, m, unbiased=True), (x, mask)),
        "whiten": (lambda x, m: rl.whiten(x, m), (x, mask)),
        "whiten_no_shift": (lambda x, m: rl.whiten(x, m, shift_mean=False), (x, mask)),
        "explained_variance": (rl.explained_variance, (x, y, mask)),
        "k1": (rl.kl_k1, (lp, ref, mask)),
        "k3": (rl.kl_k3, (lp, ref, mask)),
        "kl_rewards": (lambda s, a, b, m: rl.kl_penalized_rewards(s, a, b, m, 0.05, 1.0), (scores, lp, ref, mask)),
        "adaptive_kl": (lambda c, k: rl.adaptive_kl_coef(c, k, 64, 6.0, 1e4), (np.float32(0.2), np.float32(7.0))),
        "gae": (lambda r, v, m: rl.gae(r, v, m, 0.99, 0.95), (x, y, mask)),
        "seq_rewards": (lambda s, a, b, m: rl.sequence_kl_penalized_rewards(s, a, b, m, 0.05, 1.0),
                        (scores, lp, ref, mask)),
        "seq_values": (rl.sequence_values, (x, mask)),
        "first_valid": (rl.first_valid, (x, mask)),
        "discounted_returns": (lambda r, m: rl.discounted_returns(r, m, 0.9), (x, mask)),
        "group_grpo": (lambda s: rl.group_advantages(s, 3), (scores,)),
        "group_dr_grpo": (lambda s: rl.group_advantages(s, 2, "dr_grpo"), (scores,)),
        "group_rloo": (lambda s: rl.group_advantages(s, 3, "rloo"), (scores,)),
        "ppo_penalty_coef": (lambda b, k: rl.ppo_penalty_coef(b, k, 0.01), (np.float32(0.1), np.float32(0.02))),
    }


@pytest.mark.parametrize("name", list(_rl_cases(np.random.default_rng(0))))
def test_jit_and_vmap_agree_with_eager(name):
    cases = [_rl_cases(np.random.default_rng(seed))[name] for seed in range(3)]
    fn = cases[0][0]
    eager = [fn(*args) for _, args in cases]
    jitted = jax.jit(fn)
    for (_, args), expected in zip(cases, eager):
        jax.tree.map(lambda a, b: close(a, b, tol=1e-6), jitted(*args), expected)
    stacked_args = [np.stack(parts) for parts in zip(*[args for _, args in cases])]
    batched = jax.jit(jax.vmap(fn))(*stacked_args)
    expected_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *eager)
    jax.tree.map(lambda a, b: close(a, b, tol=1e-6), batched, expected_stacked)
