"""Losses for the InstructGPT recipe and its RL family: LM/SFT, reward-model ranking, PPO policy
(clip, clip-higher, dual-clip, penalty, sequence-level GSPO) and value, PPO-ptx, and the direct
preference losses (DPO, cDPO, IPO, SimPO).

Pure `jax.numpy` functions, safe under `jax.jit` / `jax.vmap`; all reductions are fp32 and
"token-mean" means sum over valid tokens of the whole batch / number of valid tokens (every token
weighs the same, not every sequence) unless a `loss_agg_mode` says otherwise (see `aggregate`).
Losses with diagnostics return `(loss, aux)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.rl import first_valid, kl_k3, masked_count, masked_mean, masked_sum

# --------------------------------------------------------------------------------------------
# Token log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token] in fp32: `[..., T, V]`, `[..., T]` -> `[..., T]`.

    Computed as z[token] - logsumexp(z) so the full `[..., T, V]` log-softmax is never kept.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
    """H_t = logsumexp(z) - sum_v softmax(z)_v z_v in fp32: `[..., T, V]` -> `[..., T]`."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean of the policy entropy H_t over positions with mask 1 (0 if none)."""
    return masked_mean(token_entropy(logits), mask)


# --------------------------------------------------------------------------------------------
# Language modelling (pretraining, SFT, ptx)
# --------------------------------------------------------------------------------------------


def lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean of -log p(x_t | x_<t) over t with loss_mask[t] = 1 (logits at t-1 predict token t).

    `logits [B, T, V]` from the model on `input_ids [B, T]`; `loss_mask[:, 0]` is ignored (nothing
    predicts the first token). SFT: loss_mask marks response tokens; pretraining: the attention
    mask. aux: `tokens` (number of targets) and `accuracy` (argmax hits / targets).
    """
    prediction_logits = logits[..., :-1, :]
    targets = input_ids[..., 1:]
    target_mask = loss_mask[..., 1:]
    nll = -token_logprobs(prediction_logits, targets)
    hits = (jnp.argmax(prediction_logits, axis=-1) == targets).astype(jnp.float32)
    aux = {"tokens": masked_count(target_mask), "accuracy": masked_mean(hits, target_mask)}
    return masked_mean(nll, target_mask), aux



def ppo_ptx_loss(actor_loss: jax.Array, ptx_lm_loss: jax.Array, ptx_coef) -> jax.Array:
    """L = L_actor + ptx_coef * L_LM(pretraining batch): InstructGPT's PPO-ptx (Ouyang et al. 2022, eq. 2).

    Maximising E[r - beta*KL] + gamma * E_pretrain[log pi] is minimising this with gamma = ptx_coef.
    """
    return actor_loss + ptx_coef * ptx_lm_loss


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def pairwise_ranking_loss(chosen_scores: jax.Array, rejected_scores: jax.Array) -> jax.Array:
    """mean of -log sigmoid(r_chosen - r_rejected): the Bradley-Terry RM loss (Stiennon et al. 2020)."""
    margin = chosen_scores.astype(jnp.float32) - rejected_scores.astype(jnp.float32)
    return jnp.mean(-jax.nn.log_sigmoid(margin))


def _better_pairs(ranks: jax.Array) -> jax.Array:
    """better[p, i, j] = 1.0 when response i is strictly better ranked than j (both present: rank >= 0)."""
    ranks = ranks.astype(jnp.int32)
    present = ranks >= 0
    better = (ranks[..., :, None] < ranks[..., None, :]) & present[..., :, None] & present[..., None, :]
    return better.astype(jnp.float32)


def ranking_loss(scores: jax.Array, ranks: jax.Array) -> jax.Array:
    """mean_prompts [ mean_{(i,j): rank_i < rank_j} -log sigmoid(s_i - s_j) ]: InstructGPT RM loss (eq. 1).

    `scores [P, K]`, `ranks [P, K]` with 0 = best. Each prompt contributes the mean over its
    K(K-1)/2 ordered pairs (one batch element per prompt, so a prompt with many responses does not
    dominate). Tied ranks form no pair; rank < 0 marks an absent response. Prompts without any
    pair are left out of the mean.
    """
    better = _better_pairs(ranks)
    scores = scores.astype(jnp.float32)
    pair_loss = -jax.nn.log_sigmoid(scores[..., :, None] - scores[..., None, :])
    pairs_per_prompt = jnp.sum(better, axis=(-2, -1))
    per_prompt = jnp.sum(better * pair_loss, axis=(-2, -1)) / jnp.maximum(pairs_per_prompt, 1.0)
    return masked_mean(per_prompt, pairs_per_prompt > 0)


def ranking_accuracy(scores: jax.Array, ranks: jax.Array) -> jax.Array:
    """Pairwise accuracy of scores against ranks, averaged per prompt like `ranking_loss`.

    `scores [P, K]`, `ranks [P, K]` (0 = best, < 0 absent) -> scalar fp32. Each ordered pair
    (rank_i < rank_j) counts 1 when s_i > s_j, 1/2 when s_i == s_j, else 0: a tie says nothing
    about the order, so it scores what a coin flip would (a constant model gets 0.5, not 0).
    This is the one definition used by RM training, RM evaluation and the pipeline.
    """
    better = _better_pairs(ranks)
    scores = scores.astype(jnp.float32)
    diff = scores[..., :, None] - scores[..., None, :]
    correct = (diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32)
    pairs_per_prompt = jnp.sum(better, axis=(-2, -1))
    per_prompt = jnp.sum(better * correct, axis=(-2, -1)) / jnp.maximum(pairs_per_prompt, 1.0)
    return masked_mean(per_prompt, pairs_per_prompt > 0)


# --------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017)
# --------------------------------------------------------------------------------------------


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {LOSS_AGG_MODES}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean") -> jax.Array:
    """Reduce a per-token loss `[B, T]` over the valid tokens to an fp32 scalar, verl's mode names:

      "token-mean"               sum over all valid tokens / their count (every token weighs the same)
      "seq-mean-token-mean"      each row's mean over its valid tokens, then the mean over the rows
                                 that have any (every sequence weighs the same; GRPO's 1/|o_i|)
      "seq-mean-token-sum"       each row's sum, then the mean over all B rows
      "seq-mean-token-sum-norm"  each row's sum / T (T = mask.shape[-1], a constant), mean over all
                                 B rows: Dr.GRPO's length-unbiased aggregation (Liu et al. 2025)
    Masked entries never contribute (NaN-safe). Raises ValueError for an unknown `mode`.
    """
    _check_agg_mode(mode)
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(masked_mean(per_token, mask, axis=-1), masked_count(mask, axis=-1) > 0)
    row_sums = masked_sum(per_token, mask, axis=-1)
    if mode == "seq-mean-token-sum":
        return jnp.mean(row_sums)
    return jnp.mean(row_sums / mask.shape[-1])


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                    mask: jax.Array, clip_eps, *, clip_eps_high=None, dual_clip: float | None = None,
                    loss_agg_mode: str = "token-mean") -> tuple[jax.Array, dict]:
    """Aggregate of max(-A*rho, -A*clip(rho, 1-eps, 1+eps_high)), rho = exp(log pi - log pi_old).

    The clipped surrogate of PPO (Schulman et al. 2017, eq. 7) as a loss, `[B, T]` inputs, fp32.
      `clip_eps_high`  DAPO's clip-higher (Yu et al. 2025): the range is [1 - clip_eps,
                       1 + clip_eps_high]; None means clip_eps (symmetric PPO).
      `dual_clip` c    dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games"):
                       where A < 0 the token loss is min(max(-A*rho, -A*clip(rho)), -c*A), so a
                       huge ratio on a bad action cannot give an unbounded loss. A static Python
                       number > 1 (ValueError otherwise); None turns it off.
      `loss_agg_mode`  how token losses become one number, see `aggregate` (ValueError if unknown).
    With the keywords left out this is the original token-mean PPO loss, op for op.
    aux (each a token-mean over valid tokens, whatever the loss_agg_mode): `clipfrac` = fraction
    where the clipped term wins (its gradient is 0) = `clipfrac_high` (rho above the range, A > 0)
    + `clipfrac_low` (rho below it, A < 0); `dual_clipfrac` (with dual_clip) = fraction where A < 0
    and -c*A is the smaller bound (verl's pg_clipfrac_lower; disjoint from clipfrac); `approx_kl` =
    k3 estimate of KL(pi_old || pi) = (rho - 1) - log rho (as in CleanRL); `ratio` = mean rho.
    `old_logprobs` and `advantages` are treated as constants.
    """
    _check_agg_mode(loss_agg_mode)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (a bound -c*A on the loss where A < 0), got {dual_clip}")
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs
    ratio = jnp.exp(log_ratio)
    upper = 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, upper)
    per_token = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    aux = {
        "clipfrac": masked_mean(is_clipped.astype(jnp.float32), mask),
        "clipfrac_high": masked_mean((is_clipped & (ratio > 1.0)).astype(jnp.float32), mask),
        "clipfrac_low": masked_mean((is_clipped & (ratio < 1.0)).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(kl_k3(old_logprobs, logprobs)), mask),
        "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        negative = advantages < 0
        aux["dual_clipfrac"] = masked_mean((negative & (per_token > dual_bound)).astype(jnp.float32), mask)
        per_token = jnp.where(negative, jnp.minimum(per_token, dual_bound), per_token)
    return aggregate(per_token, mask, loss_agg_mode), aux


def ppo_penalty_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                     beta) -> tuple[jax.Array, dict]:
    """token-mean(-rho*A) + beta * token-mean((rho - 1) - log rho), rho = exp(log pi - log pi_old).

    PPO's KL-penalised objective (Schulman et al. 2017, eq. 8) as a loss. The penalty is the k3
    estimator (`rl.kl_k3` with pi_old as the sampling policy): over tokens sampled from pi_old,
    E[(rho - 1) - log rho] = KL(pi_old || pi), the direction of the paper's KL[pi_old, pi].
    Gradients flow through both terms; `old_logprobs`, `advantages` are constants. Adapt `beta`
    with `rl.ppo_penalty_coef(beta, aux["kl"], target)`. `[B, T]` inputs, fp32.
    aux: `kl` (the penalty's token-mean, no gradient), `approx_kl` (the same number, under the
    name the clipped losses use), `surrogate` (the first term), `ratio` (token-mean rho).
    """
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    logprobs = logprobs.astype(jnp.float32)
    ratio = jnp.exp(logprobs - old_logprobs)
    surrogate = aggregate(-advantages * ratio, mask)
    kl = aggregate(kl_k3(old_logprobs, logprobs), mask)
    aux = {"kl": jax.lax.stop_gradient(kl), "approx_kl": jax.lax.stop_gradient(kl),
           "surrogate": jax.lax.stop_gradient(surrogate), "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask)}
    return surrogate + beta * kl, aux


def gspo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                     clip_eps, *, clip_eps_high=None) -> tuple[jax.Array, dict]:
    """mean over rows of max(-s*A, -clip(s, 1-eps, 1+eps_high)*A) with a sequence-level ratio s.

    GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): the importance ratio
    is the length-normalised sequence likelihood ratio
        s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean over valid t of (log pi - log pi_old)),
    clipped per sequence (the paper's ranges are tiny, e.g. 3e-4 / 4e-4). The sequence advantage
    A_i is `advantages` at the row's first valid token (GRPO-style advantages are the same on
    every token of a row). Rows without valid tokens are left out of the mean. `clip_eps_high`
    None means clip_eps. `[B, T]` inputs, fp32; `old_logprobs`, `advantages` are constants.
    aux: `clipfrac` = fraction of (non-empty) rows whose clipped term wins, `approx_kl` = token-mean
    k3 estimate of KL(pi_old || pi) like `ppo_policy_loss`, `ratio` = row mean of s.
    """
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs
    seq_ratio = jnp.exp(masked_mean(log_ratio, mask, axis=-1))
    seq_advantages = first_valid(advantages, mask)
    has_tokens = masked_count(mask, axis=-1) > 0
    upper = 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)
    unclipped = -seq_advantages * seq_ratio
    clipped = -seq_advantages * jnp.clip(seq_ratio, 1.0 - clip_eps, upper)
    aux = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), has_tokens),
        "approx_kl": masked_mean(jax.lax.stop_gradient(kl_k3(old_logprobs, logprobs)), mask),
        "ratio": masked_mean(jax.lax.stop_gradient(seq_ratio), has_tokens),
    }
    return masked_mean(jnp.maximum(unclipped, clipped), has_tokens), aux


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                   clip_eps) -> tuple[jax.Array, dict]:
    """Token-mean of 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2).

    The clipped value loss of OpenAI baselines' PPO2 (used by InstructGPT-style trainers: TRL,
    DeepSpeed-Chat). aux: `clipfrac` = fraction of valid tokens where the clipped term wins.
    """
    values = values.astype(jnp.float32)
    old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
    aux = {"clipfrac": masked_mean((clipped_error > unclipped_error).astype(jnp.float32), mask)}
    return loss, aux


# --------------------------------------------------------------------------------------------
# Direct preference optimisation (DPO family)
# --------------------------------------------------------------------------------------------


DPO_LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def dpo_pair_losses(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps,
                    ref_rejected_logps, beta, *, loss_type: str = "sigmoid", label_smoothing=0.0,
                    chosen_lengths=None, rejected_lengths=None, gamma=0.0) -> tuple[jax.Array, dict]:
    """Per-pair losses `[B]` and per-pair `aux` arrays `[B]` of `dpo_loss` (same arguments; no mean),
    for trainers that weight or mask pairs (e.g. the ordered pairs of a K-way ranking)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    pc = policy_chosen_logps.astype(jnp.float32)
    pr = policy_rejected_logps.astype(jnp.float32)
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='simpo' needs chosen_lengths and rejected_lengths (response tokens)")
        chosen_rewards = beta * pc / jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
        rejected_rewards = beta * pr / jnp.maximum(jnp.asarray(rejected_lengths, jnp.float32), 1.0)
        losses = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - gamma)
    else:
        rc = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logps, jnp.float32))
        rr = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logps, jnp.float32))
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                      - label_smoothing * jax.nn.log_sigmoid(-beta * h))
        else:
            losses = jnp.square(h - 1.0 / (2.0 * beta))
    margin = chosen_rewards - rejected_rewards
    accuracy = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
    aux = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards, "rewards/margin": margin,
           "rewards/accuracy": accuracy}
    return losses, jax.tree.map(jax.lax.stop_gradient, aux)


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps,
             ref_rejected_logps, beta, *, loss_type: str = "sigmoid", label_smoothing=0.0, chosen_lengths=None,
             rejected_lengths=None, gamma=0.0) -> tuple[jax.Array, dict]:
    """Direct preference optimisation losses on sequence log-probs, mean over the batch.

    Inputs are `[B]` float arrays: log pi(y_c|x), log pi(y_r|x) of the trained policy and of the
    frozen reference (no gradient flows into the reference). With h = (pc - rc) - (pr - rr):
    - "sigmoid": -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). eps = `label_smoothing` = 0 is
      DPO (Rafailov et al. 2023, eq. 7); eps > 0 is conservative DPO (cDPO, Mitchell 2023: each label
      flipped with probability eps);
    - "ipo": (h - 1/(2 beta))^2 (Azar et al. 2023, "A General Theoretical Paradigm to Understand
      Learning from Human Preferences", eq. 17); the caller chooses summed or length-averaged log-probs;
    - "simpo": -log sigma(beta (pc/|y_c| - pr/|y_r|) - gamma) (Meng et al. 2024, "SimPO", eq. 6):
      reference-free; `chosen_lengths` / `rejected_lengths` `[B]` (response tokens, >= 1) are
      required, and the reference arguments are ignored (may be None).
    Returns (scalar fp32 loss, aux of batch means): `rewards/chosen` = beta (pc - rc) and
    `rewards/rejected` = beta (pr - rr) (SimPO: its reward beta pc/|y_c|, beta pr/|y_r|),
    `rewards/margin` = chosen - rejected, `rewards/accuracy` = fraction of pairs with margin > 0, a
    margin of exactly 0 counting 1/2 (as `ranking_accuracy` counts a tie).
    Raises ValueError for an unknown `loss_type` or SimPO without lengths.
    """
    losses, aux = dpo_pair_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, gamma=gamma)
    return jnp.mean(losses), {k: jnp.mean(v) for k, v in aux.items()}
