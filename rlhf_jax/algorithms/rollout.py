"""Rollout: prompts -> responses -> scores -> log-probs and values -> rewards -> advantages.

    prompts -> sample responses (KV cache)              generation.sample
            -> score: rule rewards + normalised RM       rewards.make_rule_reward, models.reward.score
            -> old / reference log-probs, values         teacher-forced forward passes
            -> rewards with the KL leash, advantages     rl.kl_penalized_rewards + rl.gae, or the
                                                         sequence-level variant; rl.whiten
All pure and traceable: one part of the jitted iteration, or jitted alone for profiling.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from rlhf_jax import generation, losses, rl
from rlhf_jax.algorithms.types import Experience, Models, RLSettings, RLState, actor_params
from rlhf_jax.models import Transformer
from rlhf_jax.models import reward as reward_lib


def policy_forward(model: Transformer, params, seq_ids, seq_mask, prompt_len: int, temperature: float):
    """Response-position logits `[B, N, V]` (temperature-scaled, fp32) and, with a value head,
    values `[B, N]` (else None); the heads run only from position P−1 on."""
    out = model.apply({"params": params}, seq_ids, seq_mask, heads_from=prompt_len - 1)
    logits = out.logits[:, :-1] / temperature
    values = None if out.values is None else out.values[:, :-1]
    return logits, values


def critic_values(model: Transformer, params, seq_ids, seq_mask, prompt_len: int) -> jax.Array:
    """Per-token values V_t `[B, N]` read at the position that predicts response token t."""
    return model.apply({"params": params}, seq_ids, seq_mask, heads_from=prompt_len - 1).values[:, :-1]


def score_responses(models: Models, settings: RLSettings, state: RLState, seq_ids, seq_mask, tokens, mask):
    """Total score `[B]` = rule rewards + rm_weight · normalised RM score, and per-part metrics."""
    scores, parts = settings.rule_reward()(tokens, mask)
    metrics = {f"reward/{name}": jnp.mean(value) for name, value in parts.items()}
    if models.reward is not None:
        mean, std = settings.reward_norm
        rm_score = reward_lib.score(models.reward, state.reward, {"mean": mean, "std": std}, seq_ids, seq_mask)
        scores = scores + settings.rm_weight * rm_score
        metrics["reward/rm"] = jnp.mean(rm_score)
    return scores, metrics


def estimate_advantages(settings: RLSettings, scores, logprobs, ref_logprobs, token_values, mask, kl_coef,
                        baseline=None):
    """(advantages [B, N], values, returns, value_mask) for `settings.advantage`, before whitening.

    `token_values` are the critic's (None without one); `baseline [B]` the greedy responses'
    scores (ReMax). Without a critic, values are 0 and returns are the advantages."""
    kl_reward_coef = kl_coef if settings.kl_in == "reward" else 0.0
    if settings.advantage == "sequence":
        seq_value = rl.sequence_values(token_values, mask)
        seq_reward = rl.sequence_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_reward_coef,
                                                      settings.score_clip)
        seq_adv, seq_ret = rl.sequence_advantages(seq_reward, seq_value)
        values, returns = seq_value[:, None], seq_ret[:, None]
        return jnp.where(mask > 0, seq_adv[:, None], 0.0), values, returns, jnp.ones_like(values, jnp.int32)
    if settings.advantage == "gae":
        token_rewards = rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_reward_coef,
                                                settings.score_clip)
        advantages, returns = rl.gae(token_rewards, token_values, mask, settings.gamma, settings.lam)
        return advantages, token_values, returns, mask
    if settings.advantage in ("grpo", "dr_grpo", "rloo"):
        outcome = rl.sequence_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_reward_coef,
                                                   settings.score_clip)
        per_row = rl.group_advantages(outcome, settings.group_size, settings.advantage)
        advantages = jnp.where(mask > 0, per_row[:, None], 0.0)
    else:  # REINFORCE++ (optionally with the group mean subtracted) and ReMax: returns of shaped rewards
        if settings.advantage == "reinforce_pp_baseline":  # r − mean of the prompt's group
            scores = rl.group_advantages(scores, settings.group_size, "dr_grpo")
        token_rewards = rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_reward_coef,
                                                settings.score_clip)
        advantages = rl.discounted_returns(token_rewards, mask, settings.gamma)
        if settings.advantage == "remax":
            advantages = jnp.where(mask > 0, advantages - baseline[:, None], 0.0)
    return advantages, jnp.zeros_like(advantages), advantages, mask


def equal_groups(scores: jax.Array, group_size: int) -> jax.Array:
    """`[B / group_size]` bool: the groups whose scores are all equal (zero advantage for them)."""
    grouped = scores.reshape(-1, group_size)
    return jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)


def group_keep(settings: RLSettings, scores: jax.Array) -> jax.Array:
    """DAPO dynamic sampling `[B]` bool: rows of groups whose scores are not all equal (the rest
    would get zero advantage; their tokens are left out of the policy loss, the batch keeps its shape)."""
    if not settings.filter_groups:
        return jnp.ones(scores.shape, bool)
    return jnp.repeat(~equal_groups(scores, settings.group_size), settings.group_size)


def rollout(models: Models, settings: RLSettings, state: RLState, prompts: Mapping[str, jax.Array],
            rng: jax.Array) -> tuple[Experience, dict]:
    """One batch of experience from `prompts` (`prompt_ids`, `prompt_mask` `[B, P]`, left-padded;
    for group algorithms each prompt's `group_size` copies are consecutive rows) with the policy
    in `state`; returns (experience, scalar metrics)."""
    prompt_ids = prompts["prompt_ids"].astype(jnp.int32)
    prompt_mask = prompts["prompt_mask"].astype(jnp.int32)
    prompt_len = prompt_ids.shape[1]
    actor = actor_params(models, state.actor, state.ref)
    gen = generation.sample(models.actor, actor, prompt_ids, prompt_mask, rng, settings.sampling)
    tokens, mask = gen.tokens, gen.mask
    seq_ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1)

    # ---- score ------------------------------------------------------------------------------------
    scores, metrics = score_responses(models, settings, state, seq_ids, seq_mask, tokens, mask)
    baseline = None
    if settings.advantage == "remax":  # the greedy response to each prompt, scored the same way
        greedy = generation.sample(models.actor, actor, prompt_ids, prompt_mask, rng,
                                   dataclasses.replace(settings.sampling, temperature=0.0))
        greedy_seq = (jnp.concatenate([prompt_ids, greedy.tokens], 1), jnp.concatenate([prompt_mask, greedy.mask], 1))
        baseline, _ = score_responses(models, settings, state, *greedy_seq, greedy.tokens, greedy.mask)
        metrics["reward/greedy"] = jnp.mean(baseline)

    # ---- old policy, reference, values --------------------------------------------------------------
    temperature = settings.temperature
    logits, shared_values = policy_forward(models.actor, actor, seq_ids, seq_mask, prompt_len, temperature)
    logprobs = jnp.where(mask > 0, losses.token_logprobs(logits, tokens), 0.0)
    ref_logits, _ = policy_forward(models.ref, state.ref, seq_ids, seq_mask, prompt_len, temperature)
    ref_logprobs = jnp.where(mask > 0, losses.token_logprobs(ref_logits, tokens), 0.0)
    token_values = None
    if settings.critic == "shared":
        token_values = jnp.where(mask > 0, shared_values, 0.0)
    elif settings.critic == "separate":
        token_values = jnp.where(mask > 0, critic_values(models.critic, state.critic, seq_ids, seq_mask, prompt_len),
                                 0.0)

    # ---- rewards with the KL leash, advantages ------------------------------------------------------
    advantages, values, returns, value_mask = estimate_advantages(settings, scores, logprobs, ref_logprobs,
                                                                  token_values, mask, state.kl_coef, baseline)
    raw_advantages = advantages
    if settings.whiten_advantages:
        advantages = rl.whiten(advantages, mask)
    keep = group_keep(settings, scores)
    loss_mask = mask * keep[:, None].astype(mask.dtype)

    seq_kl = jnp.sum(rl.kl_k1(logprobs, ref_logprobs, mask), axis=-1)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    metrics.update({
        "reward/mean": jnp.mean(scores),
        "reward/std": jnp.std(scores),
        "kl": jnp.mean(seq_kl),
        "kl/k3": jnp.mean(jnp.sum(rl.kl_k3(logprobs, ref_logprobs, mask), axis=-1)),
        "kl_coef": state.kl_coef,
        "entropy": losses.entropy_from_logits(logits, mask),
        "response/length": jnp.mean(lengths),
        "advantages/mean": rl.masked_mean(raw_advantages, mask),
        "returns/mean": rl.masked_mean(returns, value_mask),
    })
    if settings.critic != "none":
        metrics.update({"value/mean": rl.masked_mean(values, value_mask),
                        "value/explained_variance": rl.explained_variance(values, returns, value_mask)})
    if settings.group_size > 1:
        metrics["group/zero_std_fraction"] = jnp.mean(equal_groups(scores, settings.group_size).astype(jnp.float32))
        metrics["group/effective_fraction"] = jnp.mean(keep.astype(jnp.float32))
    if state.penalty_coef is not None:
        metrics["penalty_coef"] = state.penalty_coef
    if settings.sampling.eos_id:
        ended = jnp.any(generation.is_stop(tokens, settings.sampling.eos_id) & (mask > 0), axis=-1)
        metrics["response/eos_fraction"] = jnp.mean(ended.astype(jnp.float32))
    experience = Experience(seq_ids=seq_ids, seq_mask=seq_mask, tokens=tokens, mask=mask, loss_mask=loss_mask,
                            scores=scores, kl=seq_kl, logprobs=logprobs, ref_logprobs=ref_logprobs,
                            advantages=advantages, values=values, returns=returns, value_mask=value_mask)
    return experience, metrics
