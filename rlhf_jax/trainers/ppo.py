"""PPO / PPO-ptx trainer (InstructGPT stage 3): one jitted, sharded function per iteration.

One iteration, all on device inside a single `jax.jit` (no host round trips between phases):

    prompts -> sample responses (KV cache)              generation.sample
            -> score: RM (normalised) + rule rewards     rewards.make_rule_reward
            -> old / reference log-probs, values         teacher-forced forward passes
            -> per-token rewards with the KL leash       rl.kl_penalized_rewards
            -> advantages                                rl.gae (or the sequence-level variant)
            -> whitening                                 rl.whiten
            -> epochs x minibatches of actor + critic    lax.scan, AdamW, non-finite skip
            -> KL coefficient (fixed or adaptive)        rl.adaptive_kl_coef (Ziegler et al. 2019)

Roles (DeepSpeed-Chat conventions): the actor starts from the SFT model; the critic is a separate
scalar-head network initialised from the reward model with one value per token ("token"). Config
options: a value head on the actor trunk ("shared", one optimizer, loss + vf_coef * value loss)
and one scalar per response ("sequence", ColossalChat/coati: A = R - V(seq), V(seq) = masked mean
of the critic's token values). Reference and reward model are frozen (params only). Dropout off.

Conventions: prompts `[B, P]` left-padded, responses `[B, N]`; the full sequence `[B, P + N]` has
response token t predicted at position P-1+t, which is also where its value V_t is read.
Log-probs are under the temperature-scaled policy (the one sampled from).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import generation
from rlhf_jax import losses
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import rewards as rewards_lib
from rlhf_jax import rl
from rlhf_jax import sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_params, last_token_values, lm_params_to_scalar
from rlhf_jax.trainers import common

CRITICS = ("token", "shared", "sequence")


# ----------------------------------------------------------------------------------------------
# Static settings and models
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """Hyperparameters the jitted iteration closes over (static: changing one recompiles)."""

    sampling: generation.SamplingConfig
    critic: str = "token"  # "token" | "shared" | "sequence"
    epochs: int = 1
    num_minibatches: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_adaptive: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    score_clip: Optional[float] = None
    rm_weight: float = 0.0
    reward_offset: float = 0.0  # subtracted from the raw RM score (normalisation stored with the RM)
    rules: tuple = ()  # ((name, ((key, value), ...)), ...): hashable form of config.rewards.rules
    ptx_coef: float = 0.0
    ema_decay: float = 0.0

    @property
    def temperature(self) -> float:
        return self.sampling.temperature or 1.0

    def rule_reward(self) -> Callable:
        return rewards_lib.make_rule_reward({name: dict(entry) for name, entry in self.rules})


@dataclasses.dataclass(frozen=True)
class Models:
    """The Linen modules (parameters live in `PPOState`). `critic`/`reward` are None when absent."""

    actor: Transformer  # heads ("lm",), or ("lm", "value") with a shared critic
    ref: Transformer  # heads ("lm",): the frozen SFT policy
    critic: Optional[Transformer]  # heads ("value",)
    reward: Optional[Transformer]  # heads ("value",): the frozen reward model


@flax.struct.dataclass
class PPOState:
    """Everything an exact resume needs. `critic*` are None with a shared value head, `reward`
    without a reward model, `ema` without EMA. `rng` is a raw uint32[2] key; iteration s uses
    fold_in(rng, s). `nonfinite_steps`/`nonfinite_streak` count iterations in which some update
    was skipped for a non-finite loss or gradient (total / consecutive)."""

    step: jax.Array
    actor: Any
    actor_opt: Any
    critic: Any
    critic_opt: Any
    ref: Any
    reward: Any
    ema: Any
    kl_coef: jax.Array
    rng: jax.Array
    nonfinite_steps: jax.Array
    nonfinite_streak: jax.Array


@flax.struct.dataclass
class Rollout:
    """One batch of experience. `values`/`returns`/`value_mask` are `[B, N]` for a per-token critic
    and `[B, 1]` for the sequence-level critic."""

    seq_ids: jax.Array  # [B, P+N] prompt then response
    seq_mask: jax.Array  # [B, P+N]
    tokens: jax.Array  # [B, N] response
    mask: jax.Array  # [B, N] 1 up to and including EOS
    logprobs: jax.Array  # [B, N] old policy
    advantages: jax.Array  # [B, N] (whitened when configured)
    values: jax.Array  # old values
    returns: jax.Array
    value_mask: jax.Array


def policy_forward(model: Transformer, params, seq_ids, seq_mask, prompt_len: int, temperature: float):
    """Response-position logits `[B, N, V]` (temperature-scaled) and, with a value head, values `[B, N]`."""
    out = model.apply({"params": params}, seq_ids, seq_mask)
    logits = out.logits[:, prompt_len - 1:-1] / temperature
    values = None if out.values is None else out.values[:, prompt_len - 1:-1]
    return logits, values


def critic_values(model: Transformer, params, seq_ids, seq_mask, prompt_len: int) -> jax.Array:
    """Per-token values V_t `[B, N]` read at the position that predicts response token t."""
    return model.apply({"params": params}, seq_ids, seq_mask).values[:, prompt_len - 1:-1]


def as_critic_output(token_values: jax.Array, mask: jax.Array, critic: str) -> jax.Array:
    """What the value loss sees: token values `[B, N]`, or V(seq) `[B, 1]` for the sequence critic."""
    if critic == "sequence":
        return rl.sequence_values(token_values, mask)[:, None]
    return token_values


# ----------------------------------------------------------------------------------------------
# Phase 1: rollout (generate, score, log-probs, values, rewards, advantages)
# ----------------------------------------------------------------------------------------------
def make_rollout(models: Models, settings: PPOSettings):
    """`rollout(state, prompts, rng) -> (Rollout, metrics, outputs)`; pure and traceable."""
    rule_reward = settings.rule_reward()

    def rollout(state: PPOState, prompts: Mapping[str, jax.Array], rng: jax.Array):
        prompt_ids = prompts["prompt_ids"].astype(jnp.int32)
        prompt_mask = prompts["prompt_mask"].astype(jnp.int32)
        prompt_len = prompt_ids.shape[1]
        gen = generation.sample(models.actor, state.actor, prompt_ids, prompt_mask, rng, settings.sampling)
        tokens, mask = gen.tokens, gen.mask
        seq_ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        seq_mask = jnp.concatenate([prompt_mask, mask], axis=1)
        temperature = settings.temperature

        # ---- score: rule rewards + normalised RM score ----------------------------------------
        scores, parts = rule_reward(tokens, mask)
        metrics = {f"reward/{name}": jnp.mean(value) for name, value in parts.items()}
        if models.reward is not None:
            rm_values = models.reward.apply({"params": state.reward}, seq_ids, seq_mask).values
            rm_score = last_token_values(rm_values, seq_mask) - settings.reward_offset
            scores = scores + settings.rm_weight * rm_score
            metrics["reward/rm"] = jnp.mean(rm_score)

        # ---- old policy, reference, values ------------------------------------------------------
        logits, shared_values = policy_forward(models.actor, state.actor, seq_ids, seq_mask, prompt_len, temperature)
        logprobs = jnp.where(mask > 0, losses.token_logprobs(logits, tokens), 0.0)
        ref_logits, _ = policy_forward(models.ref, state.ref, seq_ids, seq_mask, prompt_len, temperature)
        ref_logprobs = jnp.where(mask > 0, losses.token_logprobs(ref_logits, tokens), 0.0)
        if settings.critic == "shared":
            token_values = shared_values
        else:
            token_values = critic_values(models.critic, state.critic, seq_ids, seq_mask, prompt_len)
        token_values = jnp.where(mask > 0, token_values, 0.0)

        # ---- rewards with the KL leash, advantages ---------------------------------------------
        score_clip = settings.score_clip
        if settings.critic == "sequence":
            seq_value = rl.sequence_values(token_values, mask)
            seq_reward = rl.sequence_kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, state.kl_coef,
                                                          score_clip)
            seq_adv, seq_ret = rl.sequence_advantages(seq_reward, seq_value)
            advantages = jnp.where(mask > 0, seq_adv[:, None], 0.0)
            values, returns = seq_value[:, None], seq_ret[:, None]
            value_mask = jnp.ones_like(values, jnp.int32)
        else:
            token_rewards = rl.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, state.kl_coef, score_clip)
            advantages, returns = rl.gae(token_rewards, token_values, mask, settings.gamma, settings.lam)
            values, value_mask = token_values, mask
        raw_advantages = advantages
        if settings.whiten_advantages:
            advantages = rl.whiten(advantages, mask)

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
            "value/mean": rl.masked_mean(values, value_mask),
            "value/explained_variance": rl.explained_variance(values, returns, value_mask),
        })
        if settings.sampling.eos_id is not None:
            ended = jnp.any((tokens == settings.sampling.eos_id) & (mask > 0), axis=-1)
            metrics["response/eos_fraction"] = jnp.mean(ended.astype(jnp.float32))
        batch = Rollout(seq_ids=seq_ids, seq_mask=seq_mask, tokens=tokens, mask=mask, logprobs=logprobs,
                        advantages=advantages, values=values, returns=returns, value_mask=value_mask)
        outputs = {"tokens": tokens, "mask": mask, "scores": scores}
        return batch, metrics, outputs, jnp.mean(seq_kl)

    return rollout


# ----------------------------------------------------------------------------------------------
# Phase 2: update (epochs x minibatches of actor and critic steps under lax.scan)
# ----------------------------------------------------------------------------------------------
def _guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads, loss):
    """AdamW update, skipped (old params and state kept) when the loss or a gradient is not finite."""
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & common.tree_all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), finite


def minibatch_indices(rng: jax.Array, batch_size: int, epochs: int, num_minibatches: int) -> jax.Array:
    """`[epochs * num_minibatches, batch_size / num_minibatches]` row ids: a fresh permutation per epoch."""
    perms = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(jax.random.split(rng, epochs))
    return perms.reshape(epochs * num_minibatches, batch_size // num_minibatches)


def make_update(models: Models, settings: PPOSettings, actor_opt: optax.GradientTransformation,
                critic_opt: Optional[optax.GradientTransformation], batch_sharding=None):
    """`update(state, rollout, ptx, rng) -> (state, metrics)`; pure and traceable."""
    prompt_len_of = lambda ro: ro.seq_ids.shape[1] - ro.tokens.shape[1]
    constrain = (lambda tree: jax.lax.with_sharding_constraint(tree, batch_sharding)) if batch_sharding else (
        lambda tree: tree)

    def value_loss(predicted, mb: Rollout):
        return losses.ppo_value_loss(predicted, mb.values, mb.returns, mb.value_mask, settings.value_clip_eps)

    def actor_loss(params, mb: Rollout, ptx):
        logits, shared_values = policy_forward(models.actor, params, mb.seq_ids, mb.seq_mask, prompt_len_of(mb),
                                               settings.temperature)
        logprobs = losses.token_logprobs(logits, mb.tokens)
        loss, aux = losses.ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, settings.clip_eps)
        metrics = {"policy/loss": loss, "policy/clipfrac": aux["clipfrac"], "policy/approx_kl": aux["approx_kl"]}
        if settings.entropy_coef:
            loss = loss - settings.entropy_coef * losses.entropy_from_logits(logits, mb.mask)
        if settings.critic == "shared":
            predicted = as_critic_output(jnp.where(mb.mask > 0, shared_values, 0.0), mb.mask, settings.critic)
            v_loss, v_aux = value_loss(predicted, mb)
            loss = loss + settings.vf_coef * v_loss
            metrics.update({"value/loss": v_loss, "value/clipfrac": v_aux["clipfrac"]})
        if ptx is not None:
            ptx_logits = models.actor.apply({"params": params}, ptx["input_ids"], ptx["attention_mask"]).logits
            ptx_loss, _ = losses.lm_loss(ptx_logits, ptx["input_ids"], ptx["loss_mask"])
            loss = losses.ppo_ptx_loss(loss, ptx_loss, settings.ptx_coef)
            metrics["ptx/loss"] = ptx_loss
        return loss, metrics

    def critic_loss(params, mb: Rollout):
        token_values = critic_values(models.critic, params, mb.seq_ids, mb.seq_mask, prompt_len_of(mb))
        predicted = as_critic_output(jnp.where(mb.mask > 0, token_values, 0.0), mb.mask, settings.critic)
        loss, aux = value_loss(predicted, mb)
        return loss, {"value/loss": loss, "value/clipfrac": aux["clipfrac"]}

    def update(state: PPOState, batch: Rollout, ptx: Optional[Mapping[str, jax.Array]], rng: jax.Array):
        batch_size = batch.tokens.shape[0]
        n_steps = settings.epochs * settings.num_minibatches
        rows = minibatch_indices(rng, batch_size, settings.epochs, settings.num_minibatches)
        if ptx is not None:  # the ptx batch is split into the same number of minibatches, in order
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
            (loss, metrics), grads = jax.value_and_grad(actor_loss, has_aux=True)(actor, mb, mb_ptx)
            actor, actor_state, finite = _guarded_update(actor_opt, actor, actor_state, grads, loss)
            metrics = {**metrics, "loss": loss, "policy/grad_norm": optax.global_norm(grads)}
            if settings.critic != "shared":
                (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(critic, mb)
                critic, critic_state, critic_finite = _guarded_update(
                    critic_opt, critic, critic_state, critic_grads, critic_metrics["value/loss"])
                finite = finite & critic_finite
                metrics.update(critic_metrics, **{"value/grad_norm": optax.global_norm(critic_grads)})
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
        state = state.replace(actor=actor, actor_opt=actor_state, critic=critic, critic_opt=critic_state, ema=ema,
                              nonfinite_steps=state.nonfinite_steps + bad,
                              nonfinite_streak=(state.nonfinite_streak + 1) * bad)
        return state, metrics

    return update


# ----------------------------------------------------------------------------------------------
# One iteration = rollout + update + KL controller
# ----------------------------------------------------------------------------------------------
def next_kl_coef(settings: PPOSettings, kl_coef, observed_kl, batch_size: int):
    """Fixed β, or the adaptive controller of Ziegler et al. 2019 with n_steps = responses per iteration."""
    if not settings.kl_adaptive:
        return kl_coef
    return rl.adaptive_kl_coef(kl_coef, observed_kl, batch_size, settings.kl_target, settings.kl_horizon)


def make_phases(models: Models, settings: PPOSettings, actor_opt, critic_opt, lr_schedule=None,
                batch_sharding=None):
    """The iteration cut in two pure functions (jitted apart only to time them, `profile_phases`):

    collect(state, prompts) -> (rollout, metrics, outputs, observed_kl)
    learn(state, rollout, metrics, observed_kl, ptx) -> (state, metrics)
    """
    rollout = make_rollout(models, settings)
    update = make_update(models, settings, actor_opt, critic_opt, batch_sharding)
    updates_per_iteration = settings.epochs * settings.num_minibatches

    def iteration_rngs(state: PPOState):
        return jax.random.split(jax.random.fold_in(state.rng, state.step))

    def collect(state: PPOState, prompts: Mapping[str, jax.Array]):
        return rollout(state, prompts, iteration_rngs(state)[0])

    def learn(state: PPOState, batch: Rollout, metrics: dict, observed_kl, ptx):
        state, update_metrics = update(state, batch, ptx, iteration_rngs(state)[1])
        state = state.replace(step=state.step + 1,
                              kl_coef=next_kl_coef(settings, state.kl_coef, observed_kl, batch.tokens.shape[0]))
        metrics = {**metrics, **update_metrics, "nonfinite_steps": state.nonfinite_steps,
                   "nonfinite_streak": state.nonfinite_streak}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule((state.step - 1) * updates_per_iteration)
        return state, metrics

    return collect, learn


def make_iteration(models: Models, settings: PPOSettings, actor_opt, critic_opt, lr_schedule=None,
                   batch_sharding=None):
    """Pure `iteration(state, prompts, ptx) -> (state, metrics, outputs)`: the whole PPO iteration.

    `outputs` holds the sampled responses (`tokens`, `mask`) and `scores` for host-side logging
    and gold scoring; `metrics` are scalars.
    """
    collect, learn = make_phases(models, settings, actor_opt, critic_opt, lr_schedule, batch_sharding)

    def iteration(state: PPOState, prompts: Mapping[str, jax.Array], ptx: Optional[Mapping[str, jax.Array]]):
        batch, metrics, outputs, observed_kl = collect(state, prompts)
        state, metrics = learn(state, batch, metrics, observed_kl, ptx)
        return state, metrics, outputs

    return iteration
