"""RL math for RLHF-PPO and its family: masked statistics, KL estimators, KL-shaped rewards, GAE,
discounted returns, group baselines (GRPO / Dr.GRPO / RLOO), whitening, KL-coefficient controllers.

Pure `jax.numpy` functions over `[B, T]` arrays (time on the last axis), safe under `jax.jit` and
`jax.vmap`. `mask` is 1 on response tokens; rows are normally prefixes (1s then 0s) and may have
different lengths. Every function treats masked entries as absent and returns 0 there.

Conventions follow DeepSpeed-Chat / InstructGPT (Ouyang et al. 2022): the per-token reward is
`-beta * (log pi - log pi_ref)` and the (clipped) reward-model score is added at the last valid
token; GAE (Schulman et al. 2016) bootstraps with value 0 after the last valid token.

Variance convention: every variance here (masked_var, whiten, explained_variance) is the
population variance (divide by N) unless `unbiased=True` is asked of `masked_var`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _as_float_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
    """The 0/1 mask in the float dtype of `like` (at least fp32), broadcast-ready."""
    dtype = jnp.promote_types(jnp.result_type(like), jnp.float32)
    return jnp.asarray(mask).astype(bool).astype(dtype)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * m) over `axis` (all axes when None); entries with m = 0 never contribute (NaN-safe)."""
    m = _as_float_mask(mask, x)
    return jnp.sum(jnp.where(m > 0, x, 0).astype(m.dtype), axis=axis)


def masked_count(mask: jax.Array, axis=None) -> jax.Array:
    """Number of valid entries, as fp32."""
    return jnp.sum(jnp.asarray(mask).astype(bool).astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * m) / sum(m) over `axis`; 0 where there is no valid entry (instead of NaN)."""
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, axis=None, unbiased: bool = False) -> jax.Array:
    """sum(m * (x - mean)^2) / (N - ddof), ddof = 1 if `unbiased` else 0; 0 when N <= ddof."""
    mean = masked_mean(x, mask, axis)
    mean = mean if axis is None else jnp.expand_dims(mean, axis)
    squared_deviation = masked_sum(jnp.square(x - mean), mask, axis)
    ddof = 1.0 if unbiased else 0.0
    return squared_deviation / jnp.maximum(masked_count(mask, axis) - ddof, 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over all valid entries (+ mean back if not `shift_mean`); 0 on padding.

    Advantage normalisation as in PPO implementations (OpenAI baselines, TRL `masked_whiten`); the
    statistics use only entries with mask 1, so padded values cannot change the result.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(jnp.asarray(mask).astype(bool), whitened, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over valid entries; NaN when Var[returns] = 0.

    The critic diagnostic of OpenAI baselines / CleanRL: 1 is a perfect critic, 0 is no better
    than predicting the mean return, negative is worse.
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    safe_var = jnp.where(var_returns > 0, var_returns, 1.0)
    return jnp.where(var_returns > 0, 1.0 - var_residual / safe_var, jnp.nan)


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020)
# --------------------------------------------------------------------------------------------
# Tokens are sampled from the policy pi; with log r = log pi_ref - log pi each estimator has
# E_pi[k] = KL(pi || pi_ref) (k1 and k3 unbiased; k3 >= 0 with lower variance; Schulman 2020).


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """k1 = -log r = log pi - log pi_ref per token (unbiased, can be negative); 0 on padding."""
    return _mask_or_pass(logprobs - ref_logprobs, mask)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """k3 = (r - 1) - log r per token (unbiased, >= 0, low variance); 0 on padding."""
    log_r = ref_logprobs - logprobs
    return _mask_or_pass(jnp.expm1(log_r) - log_r, mask)


def _mask_or_pass(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else jnp.where(jnp.asarray(mask).astype(bool), x, 0.0)


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def last_valid_onehot(mask: jax.Array) -> jax.Array:
    """1.0 at the last position with mask 1 in each row of `[..., T]`, 0 elsewhere (all 0 for an empty row)."""
    valid = jnp.asarray(mask).astype(bool)
    n_steps = valid.shape[-1]
    last_index = n_steps - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
    onehot = jnp.arange(n_steps) == last_index[..., None]
    return (onehot & jnp.any(valid, axis=-1, keepdims=True)).astype(jnp.float32)


def first_valid(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x at the first position with mask 1 in each row: `[..., T]` -> `[...]` fp32; 0 for an empty row."""
    valid = jnp.asarray(mask).astype(bool)
    picked = jnp.take_along_axis(x, jnp.argmax(valid, axis=-1)[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.any(valid, axis=-1), picked, 0.0).astype(jnp.promote_types(picked.dtype, jnp.float32))


def kl_penalized_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array,
                         mask: jax.Array, kl_coef, score_clip: float | None = None) -> jax.Array:
    """r_t = -kl_coef * (log pi - log pi_ref)_t + [t = last valid] * clip(score, ±score_clip).

    DeepSpeed-Chat `compute_rewards` / Ziegler et al. 2019: the KL leash is paid per token, the
    reward-model score `scores [B]` once at the last valid token of each row. 0 on padding.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if score_clip is not None:
        scores = jnp.clip(scores, -score_clip, score_clip)
    kl_reward = -kl_coef * kl_k1(logprobs.astype(jnp.float32), ref_logprobs.astype(jnp.float32), mask)
    return kl_reward + last_valid_onehot(mask) * scores[..., None]


def adaptive_kl_coef(kl_coef, observed_kl, n_steps, target, horizon) -> jax.Array:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    The proportional controller of Ziegler et al. 2019 ("Fine-Tuning LMs from Human
    Preferences", eq. 2): `n_steps` is the number of samples (or steps) since the last update.
    """
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def ppo_penalty_coef(beta, observed_kl, kl_target) -> jax.Array:
    """beta / 2 if KL < target / 1.5, 2 * beta if KL > 1.5 * target, else beta (fp32 scalar).

    The adaptive KL penalty of PPO (Schulman et al. 2017, section 4, "Adaptive KL Penalty
    Coefficient"): `observed_kl` is the mean KL(pi_old || pi) of the last update, e.g. the
    `kl` of `losses.ppo_penalty_loss`. Traceable (no Python branching on values).
    """
    beta = jnp.asarray(beta, jnp.float32)
    observed_kl = jnp.asarray(observed_kl, jnp.float32)
    kl_target = jnp.asarray(kl_target, jnp.float32)
    return jnp.where(observed_kl < kl_target / 1.5, beta / 2.0,
                     jnp.where(observed_kl > kl_target * 1.5, beta * 2.0, beta))


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam) -> tuple[jax.Array, jax.Array]:
    """A_t = delta_t + gamma*lam*A_{t+1},  delta_t = r_t + gamma*V_{t+1} - V_t;  R_t = A_t + V_t.

    Generalised Advantage Estimation (Schulman et al. 2016) as a reverse `lax.scan` over the last
    axis. V and A after the last valid token are 0 (the episode ends there: DeepSpeed-Chat).
    A masked position returns 0 and cuts the recursion (a hole ends the segment before it).
    Returns `(advantages, returns)`, both fp32 with the shape of `rewards`.
    """
    valid = jnp.asarray(mask).astype(bool)
    rewards = jnp.where(valid, rewards, 0.0).astype(jnp.float32)
    values = jnp.where(valid, values, 0.0).astype(jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, inputs):
        next_advantage, next_value = carry
        reward, value, is_valid = inputs
        delta = reward + gamma * next_value - value
        advantage = jnp.where(is_valid, delta + gamma * lam * next_advantage, 0.0)
        return (advantage, value), advantage

    time_major = [jnp.moveaxis(x, -1, 0) for x in (rewards, values, valid)]
    zeros = jnp.zeros(rewards.shape[:-1], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = jnp.moveaxis(advantages, 0, -1)
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma) -> jax.Array:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the valid run containing t -> `[B, T]` fp32, 0 on padding.

    Returns-to-go of per-token rewards, the advantage of REINFORCE++ before its batch-wide
    normalisation (Hu 2025, "REINFORCE++", with the rewards of `kl_penalized_rewards` and
    `whiten` afterwards). It is exactly `gae` with values 0 and lam = 1 (delta_t = r_t), so it
    shares gae's scan and conventions: nothing after the last valid token, a hole cuts the sum.
    """
    rewards = jnp.asarray(rewards)
    advantages, _ = gae(rewards, jnp.zeros_like(rewards, jnp.float32), mask, gamma, 1.0)
    return advantages


# --------------------------------------------------------------------------------------------
# Group baselines (one scalar score per response, G responses per prompt)
# --------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(scores: jax.Array, group_size: int, estimator: str = "grpo", eps: float = 1e-6) -> jax.Array:
    """Per-response advantage against the other responses to the same prompt: `scores [B]` -> `[B]` fp32.

    Rows g*G ... (g+1)*G - 1 (G = `group_size`) are the G responses of prompt g. With the group
    mean m_g and the sample standard deviation s_g (ddof = 1, as TRL, verl and OpenRLHF compute it):
      "grpo":    (r - m_g) / (s_g + eps)      Shao et al. 2024 (DeepSeekMath, section 4.1.2)
      "dr_grpo": r - m_g                      Liu et al. 2025 ("Understanding R1-Zero-like training")
      "rloo":    r - mean of the other G - 1 = G / (G - 1) * (r - m_g)   Ahmadian et al. 2024
    A group of size 1 has no baseline and gets 0 under every estimator (never NaN). The mean is
    taken relative to the group's first score, so a group of equal scores gives exactly 0.
    `group_size` and `estimator` are static Python values. Raises ValueError when B is not a
    multiple of `group_size` (or `group_size` < 1) and for an unknown `estimator`.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {GROUP_ESTIMATORS}")
    scores = jnp.asarray(scores)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    n_rows = scores.shape[-1]
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"batch size {n_rows} is not a multiple of group_size {group_size}")
    grouped = scores.reshape(scores.shape[:-1] + (n_rows // group_size, group_size))
    shifted = grouped - grouped[..., :1]  # exact zeros for a group of equal scores
    centered = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
    if estimator == "grpo":
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / max(group_size - 1, 1))
        advantages = centered / (std + eps)
    elif estimator == "dr_grpo":
        advantages = centered
    else:  # rloo
        advantages = centered * (group_size / (group_size - 1) if group_size > 1 else 0.0)
    return advantages.reshape(scores.shape)


# --------------------------------------------------------------------------------------------
# Sequence-level critic variant (one value per response)
# --------------------------------------------------------------------------------------------
# Early ColossalChat (coati) trained PPO with a single reward and a single critic value per
# response instead of per-token GAE: advantage = (score - beta * KL) - V(sequence). These helpers
# give that variant as pure math; the PPO trainer uses it with `critic='sequence'`.


def sequence_values(values: jax.Array, mask: jax.Array) -> jax.Array:
    """V(seq) = masked mean of per-token values over the response -> `[B]`."""
    return masked_mean(values, mask, axis=-1)


def sequence_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef,
                                  score_clip: float | None = None) -> jax.Array:
    """R = clip(score) - kl_coef * sum_t (log pi - log pi_ref)_t -> `[B]`: the row sum of
    kl_penalized_rewards (a row without valid tokens gets no score, only its (zero) KL term).
    The per-response reward of the sequence critic and of the outcome estimators (GRPO, RLOO)."""
    if score_clip is not None:
        scores = jnp.clip(scores, -score_clip, score_clip)
    scores = jnp.where(jnp.any(jnp.asarray(mask).astype(bool), axis=-1), scores, 0.0)
    return scores - kl_coef * jnp.sum(kl_k1(logprobs, ref_logprobs, mask), axis=-1)


def sequence_advantages(sequence_rewards: jax.Array, sequence_value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A = R - V(seq), returns = R: one-step (gamma = lam = 1, single action) advantage -> `([B], [B])`."""
    return sequence_rewards - sequence_value, sequence_rewards
