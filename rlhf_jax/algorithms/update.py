"""Update: epochs x minibatches of actor (and critic) steps under `lax.scan`; the iteration.

    iteration(state, batch) = rollout -> update -> KL coefficients (fixed or adaptive) -> step + 1

The actor loss is the chosen policy loss (`policy_objective`: clipped surrogate, PPO-penalty or
GSPO's sequence ratio), plus β · the KL-to-reference term when the KL goes into the loss, minus
entropy_coef · entropy, plus vf_coef · clipped value loss with a shared value head, plus
ptx_coef · LM loss (PPO-ptx). A separate critic takes its own clipped value-loss step on the same
minibatch. Every optimizer step goes through `optim.guarded_update` (skipped when not finite).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, optim, rl
from rlhf_jax.algorithms.rollout import critic_values, policy_forward, rollout
from rlhf_jax.algorithms.types import (Experience, Models, Optimizers, RLSettings, RLState, actor_params,
                                      critic_params)


def minibatch_indices(rng: jax.Array, batch_size: int, epochs: int, num_minibatches: int) -> jax.Array:
    """`[epochs * num_minibatches, batch_size / num_minibatches]` row ids: a fresh permutation per epoch."""
    perms = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(jax.random.split(rng, epochs))
    return perms.reshape(epochs * num_minibatches, batch_size // num_minibatches)


def predicted_values(settings: RLSettings, token_values: jax.Array, mask: jax.Array) -> jax.Array:
    """What the value loss sees: token values `[B, N]`, or V(seq) `[B, 1]` for sequence advantages."""
    token_values = jnp.where(mask > 0, token_values, 0.0)
    if settings.advantage == "sequence":
        return rl.sequence_values(token_values, mask)[:, None]
    return token_values


def value_loss(settings: RLSettings, token_values: jax.Array, mb: Experience):
    predicted = predicted_values(settings, token_values, mb.mask)
    return losses.ppo_value_loss(predicted, mb.values, mb.returns, mb.value_mask, settings.value_clip_eps)


def policy_objective(settings: RLSettings, logprobs, mb: Experience, penalty_coef):
    """(loss, metrics) of the chosen policy loss on the minibatch's `loss_mask` tokens."""
    mask = mb.loss_mask
    if settings.policy_loss == "penalty":
        loss, aux = losses.ppo_penalty_loss(logprobs, mb.logprobs, mb.advantages, mask, penalty_coef)
    elif settings.policy_loss == "gspo":
        loss, aux = losses.gspo_policy_loss(logprobs, mb.logprobs, mb.advantages, mask, settings.clip_eps,
                                            clip_eps_high=settings.clip_eps_high)
    else:
        loss, aux = losses.ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mask, settings.clip_eps,
                                           clip_eps_high=settings.clip_eps_high, dual_clip=settings.dual_clip,
                                           loss_agg_mode=settings.loss_agg_mode)
    return loss, {"policy/loss": loss, **{f"policy/{k}": v for k, v in aux.items()}}


def actor_loss(models: Models, settings: RLSettings, params, mb: Experience, ptx, kl_coef, penalty_coef):
    """(loss, metrics) of the actor (and a shared value head) on one minibatch."""
    prompt_len = mb.seq_ids.shape[1] - mb.tokens.shape[1]
    logits, shared_values = policy_forward(models.actor, params, mb.seq_ids, mb.seq_mask, prompt_len,
                                           settings.temperature)
    logprobs = losses.token_logprobs(logits, mb.tokens)
    loss, metrics = policy_objective(settings, logprobs, mb, penalty_coef)
    if settings.kl_in == "loss":  # β · aggregated per-token estimate of KL(π_θ ‖ π_ref) (GRPO)
        estimator = rl.kl_k3 if settings.kl_estimator == "k3" else rl.kl_k1
        kl_loss = losses.aggregate(estimator(logprobs, mb.ref_logprobs, mb.loss_mask), mb.loss_mask,
                                   settings.loss_agg_mode)
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    if settings.entropy_coef:
        loss = loss - settings.entropy_coef * losses.entropy_from_logits(logits, mb.mask)
    if settings.critic == "shared":
        v_loss, v_aux = value_loss(settings, shared_values, mb)
        loss = loss + settings.vf_coef * v_loss
        metrics.update({"value/loss": v_loss, "value/clipfrac": v_aux["clipfrac"]})
    if ptx is not None:
        ptx_logits = models.actor.apply({"params": params}, ptx["input_ids"], ptx["attention_mask"]).logits
        ptx_loss, _ = losses.lm_loss(ptx_logits, ptx["input_ids"], ptx["loss_mask"])
        loss = losses.ppo_ptx_loss(loss, ptx_loss, settings.ptx_coef)
        metrics["ptx/loss"] = ptx_loss
    return loss, metrics


def critic_loss(models: Models, settings: RLSettings, params, mb: Experience):
    """(loss, metrics) of a separate critic on one minibatch."""
    prompt_len = mb.seq_ids.shape[1] - mb.tokens.shape[1]
    loss, aux = value_loss(settings, critic_values(models.critic, params, mb.seq_ids, mb.seq_mask, prompt_len), mb)
    return loss, {"value/loss": loss, "value/clipfrac": aux["clipfrac"]}


def next_kl_coef(settings: RLSettings, kl_coef, observed_kl, batch_size: int):
    """Fixed β, or the adaptive controller of Ziegler et al. 2019 with n_steps = responses per iteration."""
    if not settings.kl_adaptive:
        return kl_coef
    return rl.adaptive_kl_coef(kl_coef, observed_kl, batch_size, settings.kl_target, settings.kl_horizon)


def update(models: Models, settings: RLSettings, optimizers: Optimizers, state: RLState, batch: Experience,
           ptx: Optional[Mapping[str, jax.Array]], rng: jax.Array, batch_sharding=None) -> tuple[RLState, dict]:
    """`settings.epochs` x `num_minibatches` guarded steps on `batch` (a fresh row permutation per
    epoch; the ptx batch split into the same number of minibatches, in order), the EMA of the actor,
    the KL coefficient for the next iteration and `step + 1`. Returns (state, mean metrics)."""
    constrain = (lambda tree: jax.lax.with_sharding_constraint(tree, batch_sharding)) if batch_sharding else (
        lambda tree: tree)
    batch_size = batch.tokens.shape[0]
    n_steps = settings.updates_per_iteration
    rows = minibatch_indices(rng, batch_size, settings.epochs, settings.num_minibatches)
    if ptx is not None:
        ptx_rows = ptx["input_ids"].shape[0] // settings.num_minibatches
        ptx_ids = jnp.tile(jnp.arange(settings.num_minibatches * ptx_rows).reshape(settings.num_minibatches, -1),
                           (settings.epochs, 1))
    else:
        ptx_ids = jnp.zeros((n_steps, 0), jnp.int32)

    def step(carry, xs):
        actor, actor_state, critic, critic_state, all_finite = carry
        mb_rows, mb_ptx_rows = xs
        mb = constrain(jax.tree.map(lambda x: jnp.take(x, mb_rows, axis=0), batch))
        mb_ptx = None if ptx is None else constrain(jax.tree.map(lambda x: jnp.take(x, mb_ptx_rows, axis=0), ptx))
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: actor_loss(models, settings, actor_params(models, p, state.ref), mb, mb_ptx, state.kl_coef,
                                 state.penalty_coef),
            has_aux=True)(actor)
        actor, actor_state, finite = optim.guarded_update(optimizers.actor, actor, actor_state, grads, loss)
        metrics = {**metrics, "loss": loss, "policy/grad_norm": optax.tree.norm(grads)}
        if settings.critic == "separate":
            (c_loss, c_metrics), c_grads = jax.value_and_grad(
                lambda p: critic_loss(models, settings, critic_params(models, p, state), mb), has_aux=True)(critic)
            critic, critic_state, c_finite = optim.guarded_update(optimizers.critic, critic, critic_state, c_grads,
                                                                  c_loss)
            finite = finite & c_finite
            metrics.update(c_metrics, **{"value/grad_norm": optax.tree.norm(c_grads)})
        metrics["nonfinite_updates"] = (~finite).astype(jnp.float32)
        return (actor, actor_state, critic, critic_state, all_finite & finite), metrics

    carry = (state.actor, state.actor_opt, state.critic, state.critic_opt, jnp.array(True))
    (actor, actor_state, critic, critic_state, all_finite), per_step = jax.lax.scan(step, carry, (rows, ptx_ids))
    metrics = jax.tree.map(jnp.mean, per_step)
    metrics["nonfinite_updates"] = metrics["nonfinite_updates"] * n_steps
    ema = state.ema
    if ema is not None:
        decay = settings.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, actor)
    bad = (~all_finite).astype(jnp.int32)
    penalty_coef = state.penalty_coef
    if penalty_coef is not None:  # PPO-penalty: d = KL(π_old ‖ π_θ) measured over this iteration's update
        penalty_coef = rl.ppo_penalty_coef(penalty_coef, metrics["policy/kl"], settings.penalty_target)
    state = state.replace(
        step=state.step + 1, actor=actor, actor_opt=actor_state, critic=critic, critic_opt=critic_state, ema=ema,
        kl_coef=next_kl_coef(settings, state.kl_coef, jnp.mean(batch.kl), batch_size), penalty_coef=penalty_coef,
        nonfinite_steps=state.nonfinite_steps + bad, nonfinite_streak=(state.nonfinite_streak + 1) * bad)
    metrics.update({"nonfinite_steps": state.nonfinite_steps, "nonfinite_streak": state.nonfinite_streak,
                    "lr": optimizers.lr_schedule((state.step - 1) * n_steps)})
    return state, metrics


def iteration_keys(state: RLState) -> tuple[jax.Array, jax.Array]:
    """(rollout key, update key) of iteration `state.step`: split(fold_in(state.rng, state.step))."""
    rollout_rng, update_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    return rollout_rng, update_rng


def iteration(models: Models, settings: RLSettings, optimizers: Optimizers, state: RLState,
              batch: Mapping[str, Optional[Mapping[str, jax.Array]]], batch_sharding=None):
    """The whole RL iteration, pure: `batch` = {"prompts": {prompt_ids, prompt_mask}, "ptx": LM
    batch or None, optionally "responses" and "host_scores" (see `rollout`: responses generated by
    an earlier program and the host reward functions' scores)}. Returns (state, metrics, outputs);
    `outputs` = the sampled `tokens`, `mask` and `scores` (batch-sharded) for host-side logging and
    gold scoring; metrics are scalars."""
    rollout_rng, update_rng = iteration_keys(state)
    experience, metrics = rollout(models, settings, state, batch["prompts"], rollout_rng, batch.get("responses"),
                                  batch.get("host_scores"))
    state, update_metrics = update(models, settings, optimizers, state, experience, batch["ptx"], update_rng,
                                   batch_sharding)
    outputs = {"tokens": experience.tokens, "mask": experience.mask, "scores": experience.scores}
    return state, {**metrics, **update_metrics}, outputs
