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
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import data as data_lib
from rlhf_jax import generation
from rlhf_jax import losses
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import rewards as rewards_lib
from rlhf_jax import rl
from rlhf_jax import sharding
from rlhf_jax.models import Transformer, init_params, lm_params_to_scalar
from rlhf_jax.trainers import common
from rlhf_jax.trainers import rm as rm_lib

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
    reward_norm: tuple = (0.0, 1.0)  # RM score = (raw − mean) / std, stored with the RM (rm.reward_norm)
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
    out = model.apply({"params": params}, seq_ids, seq_mask, heads_from=prompt_len - 1)
    logits = out.logits[:, :-1] / temperature
    values = None if out.values is None else out.values[:, :-1]
    return logits, values


def critic_values(model: Transformer, params, seq_ids, seq_mask, prompt_len: int) -> jax.Array:
    """Per-token values V_t `[B, N]` read at the position that predicts response token t."""
    return model.apply({"params": params}, seq_ids, seq_mask, heads_from=prompt_len - 1).values[:, :-1]


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
            mean, std = settings.reward_norm
            rm_score = rm_lib.score(models.reward, state.reward, {"mean": mean, "std": std}, seq_ids, seq_mask)
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
            metrics = {**metrics, "loss": loss, "policy/grad_norm": optax.tree.norm(grads)}
            if settings.critic != "shared":
                (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(critic, mb)
                critic, critic_state, critic_finite = _guarded_update(
                    critic_opt, critic, critic_state, critic_grads, critic_metrics["value/loss"])
                finite = finite & critic_finite
                metrics.update(critic_metrics, **{"value/grad_norm": optax.tree.norm(critic_grads)})
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


# ==============================================================================================
# Host side: config checks, models, state, data, the loop
# ==============================================================================================
def settings_from_config(config, reward_norm: tuple[float, float] = (0.0, 1.0)) -> PPOSettings:
    """Static iteration settings from the ConfigDict (rules validated, -1 eos -> None)."""
    rollout, ppo, kl = config.rollout, config.ppo, config.kl
    rules = rewards_lib.active_rules(config.rewards.rules)
    return PPOSettings(
        sampling=generation.SamplingConfig(
            max_new_tokens=rollout.max_new_tokens, temperature=float(rollout.temperature), top_k=rollout.top_k,
            top_p=float(rollout.top_p), eos_id=None if rollout.eos_id < 0 else rollout.eos_id,
            pad_id=rollout.pad_id),
        critic=config.critic, epochs=ppo.epochs, num_minibatches=ppo.num_minibatches, clip_eps=ppo.clip_eps,
        value_clip_eps=ppo.value_clip_eps, gamma=ppo.gamma, lam=ppo.lam, whiten_advantages=ppo.whiten_advantages,
        vf_coef=ppo.vf_coef, entropy_coef=ppo.entropy_coef, kl_adaptive=kl.adaptive, kl_target=kl.target,
        kl_horizon=kl.horizon, score_clip=config.rewards.score_clip or None, rm_weight=config.rewards.rm_weight,
        reward_norm=tuple(reward_norm),
        rules=tuple((name, tuple(sorted(entry.items()))) for name, entry in sorted(rules.items())),
        ptx_coef=config.ptx.coef, ema_decay=config.ema_decay)


def validate_config(config, mesh_shape: tuple[int, int, int]) -> None:
    """One-line errors naming the config key, before anything is built or compiled."""
    def fail(message):
        raise ValueError(message)

    if config.critic not in CRITICS:
        fail(f"config.critic={config.critic!r} (allowed: {', '.join(map(repr, CRITICS))})")
    if config.critic_init not in ("actor", "reward"):
        fail(f"config.critic_init={config.critic_init!r} (allowed: 'actor', 'reward')")
    paths = {"actor_checkpoint": config.actor_checkpoint, "reward_checkpoint": config.reward_checkpoint,
             **{f"data.{key}": config.data[key] for key in ("prompts", "tokenizer", "ptx")}}
    for key, path in paths.items():
        if path and not epath.Path(path).exists():
            fail(f"config.{key}={path!r} does not exist")
    if config.critic_init == "reward" and config.critic != "shared" and not config.reward_checkpoint:
        fail("config.critic_init='reward' needs config.reward_checkpoint (or set config.critic_init='actor')")
    if config.rewards.rm_weight and not config.reward_checkpoint:
        fail(f"config.rewards.rm_weight={config.rewards.rm_weight} but config.reward_checkpoint is empty: set the RM "
             "checkpoint path or --config.rewards.rm_weight=0 (rule rewards only)")
    rules = rewards_lib.active_rules(config.rewards.rules)
    if not config.rewards.rm_weight and not rules:
        fail("config.rewards: no reward at all (rm_weight=0 and every rule weight is 0)")
    if not config.data.prompts and config.actor_checkpoint:
        fail("config.data.prompts is empty: synthetic prompts are only for a from-scratch actor "
             "(config.actor_checkpoint='')")
    if config.rollout.temperature <= 0:
        fail(f"config.rollout.temperature={config.rollout.temperature}: PPO samples from the policy, need > 0")
    for key in ("epochs", "num_minibatches"):
        if config.ppo[key] < 1:
            fail(f"config.ppo.{key}={config.ppo[key]}: need >= 1")
    if not 0.0 <= config.ema_decay < 1.0:
        fail(f"config.ema_decay={config.ema_decay}: need 0 <= ema_decay < 1 (0 = off)")
    if not config.kl.blowup_threshold > 0:
        fail(f"config.kl.blowup_threshold={config.kl.blowup_threshold}: need > 0 (sequence KL in nats that is "
             "reported as a blow-up)")
    if config.kl.coef < 0 or config.kl.target <= 0 or config.kl.horizon <= 0:
        fail(f"config.kl: need coef >= 0, target > 0, horizon > 0 (got {config.kl.coef}, {config.kl.target}, "
             f"{config.kl.horizon})")
    common.validate_batch("rollout.batch_size", config.rollout.batch_size, mesh_shape,
                          config.ppo.num_minibatches, "ppo.num_minibatches")
    if config.ptx.coef:
        common.validate_batch("ptx.batch_size", config.ptx.batch_size, mesh_shape,
                              config.ppo.num_minibatches, "ppo.num_minibatches")
    if not config.actor_checkpoint:
        total = config.rollout.prompt_len + config.rollout.max_new_tokens
        if total > config.model.max_len:
            fail(f"config.rollout.prompt_len + max_new_tokens = {total} exceeds config.model.max_len="
                 f"{config.model.max_len}")
        vocab = config.model.vocab_size
        for key in ("eos_id", "pad_id"):
            if config.rollout[key] >= vocab:
                fail(f"config.rollout.{key}={config.rollout[key]} is outside the vocabulary ({vocab})")
        if config.data.min_prompt_len < 1 or config.data.min_prompt_len > config.rollout.prompt_len:
            fail(f"config.data.min_prompt_len={config.data.min_prompt_len}: need 1..rollout.prompt_len")


def validate_models(config, models: Models) -> None:
    """Checks that need the architectures (known once the earlier stages' metadata is read)."""
    cfg = models.actor.config
    total = config.rollout.prompt_len + config.rollout.max_new_tokens
    if cfg.positions == "learned" and total > cfg.max_len:
        raise ValueError(f"config.rollout.prompt_len + max_new_tokens = {total} exceeds the actor's learned "
                         f"position table (max_len={cfg.max_len})")
    for key in ("eos_id", "pad_id"):
        if config.rollout[key] >= cfg.vocab_size:
            raise ValueError(f"config.rollout.{key}={config.rollout[key]} is outside the actor's vocabulary "
                             f"({cfg.vocab_size})")
    if models.reward is not None and models.reward.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"config.reward_checkpoint: the reward model's vocabulary ({models.reward.config.vocab_size})"
                         f" differs from the actor's ({cfg.vocab_size}); they must share the tokenizer")


# ----------------------------------------------------------------------------------------------
# Models and parameters (hand-off: actor and reference from SFT, reward model and critic from the RM)
# ----------------------------------------------------------------------------------------------
def init_source(path: str) -> str:
    """"scratch" for "", "hf" for a Hugging Face directory (config.json + safetensors), else
    "checkpoint" (an rlhf_jax run dir, whose config.json is the run's config, not a model's)."""
    if not path:
        return "scratch"
    directory = epath.Path(path)
    has_weights = any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists()
    return "hf" if (directory / "config.json").exists() and has_weights else "checkpoint"


def stage_view(config, path: str) -> ml_collections.ConfigDict:
    """The `init`, `model`, `data.tokenizer` and `fast_compile` fields that the shared hand-off helpers
    (`common.architecture`, `initial_params`, `tokenizer_path`) read, for a model that starts from
    `path`: an earlier stage's run dir (Orbax), a local HF dir, or "" (from scratch, config.model)."""
    source = init_source(path)
    model = {**config.model.to_dict(), "dropout_rate": 0.0}  # PPO runs with dropout off
    return ml_collections.ConfigDict({"init": {"source": source, "path": path}, "model": model,
                                      "data": {"tokenizer": config.data.tokenizer},
                                      "fast_compile": config.get("fast_compile", False)})


def build_models(config) -> Models:
    """The four roles' modules (no weights) from the config and the earlier stages' metadata."""
    ref = common.architecture(stage_view(config, config.actor_checkpoint), heads=("lm",))
    reward = None
    if config.reward_checkpoint:
        reward = common.architecture(stage_view(config, config.reward_checkpoint), heads=("value",))
    critic = None
    if config.critic != "shared":
        critic = Transformer((reward if config.critic_init == "reward" else ref).config, heads=("value",))
    actor = Transformer(ref.config, heads=("lm", "value") if config.critic == "shared" else ("lm",))
    return Models(actor=actor, ref=ref, critic=critic, reward=reward)


def reward_norm_from_checkpoint(path: str) -> tuple[float, float]:
    """(mean, std) stored with the RM (`rm.reward_norm`): score = (raw − mean) / std; identity for HF dirs."""
    if init_source(path) != "checkpoint":
        return 0.0, 1.0
    norm = checkpoint_lib.read_meta(path).get("reward_norm", rm_lib.IDENTITY_NORM)
    return float(norm["mean"]), float(norm["std"])


@dataclasses.dataclass
class Optimizers:
    actor: optax.GradientTransformation
    critic: Optional[optax.GradientTransformation]
    lr_schedule: Callable


def make_optimizers(config, models: Models) -> Optimizers:
    """AdamW per trained network; schedules count optimizer updates (epochs x minibatches each iteration)."""
    updates = config.num_steps * config.ppo.epochs * config.ppo.num_minibatches
    actor_opt, schedule = common.make_optimizer(config.actor_optim, updates)
    critic_opt = None if models.critic is None else common.make_optimizer(config.critic_optim, updates)[0]
    return Optimizers(actor=actor_opt, critic=critic_opt, lr_schedule=schedule)


def state_shardings(models: Models, optimizers: Optimizers, mesh, ema: bool) -> PPOState:
    """PPOState of NamedShardings: params by their logical axes, optimizer moments alike, scalars replicated."""
    rep = sharding.replicated(mesh)

    def shapes(model):
        return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))

    actor_sh = sharding.param_shardings(models.actor, mesh)
    critic_sh = None if models.critic is None else sharding.param_shardings(models.critic, mesh)
    return PPOState(
        step=rep, actor=actor_sh,
        actor_opt=common.opt_state_shardings(optimizers.actor, shapes(models.actor), actor_sh, mesh),
        critic=critic_sh,
        critic_opt=None if critic_sh is None else common.opt_state_shardings(
            optimizers.critic, shapes(models.critic), critic_sh, mesh),
        ref=sharding.param_shardings(models.ref, mesh),
        reward=None if models.reward is None else sharding.param_shardings(models.reward, mesh),
        ema=actor_sh if ema else None, kl_coef=rep, rng=rep, nonfinite_steps=rep, nonfinite_streak=rep)


def create_state(actor, critic, ref, reward, optimizers: Optimizers, kl_coef: float, rng, ema: bool) -> PPOState:
    """Fresh state (traceable: jit it with out_shardings so optimizer moments are born sharded)."""
    zero = jnp.zeros((), jnp.int32)
    return PPOState(step=zero, actor=actor, actor_opt=optimizers.actor.init(actor), critic=critic,
                    critic_opt=None if critic is None else optimizers.critic.init(critic), ref=ref, reward=reward,
                    ema=jax.tree.map(jnp.copy, actor) if ema else None, kl_coef=jnp.asarray(kl_coef, jnp.float32),
                    rng=rng, nonfinite_steps=zero, nonfinite_streak=zero)


def initial_state(config, models: Models, optimizers: Optimizers, state_sh: PPOState, mesh) -> PPOState:
    """Reference = actor = SFT params (or a fresh init); RM params; critic from the RM or the actor
    (trunk copied, unembedding dropped, fresh value head); optimizer moments created sharded."""
    init_rng, head_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    ref = common.initial_params(stage_view(config, config.actor_checkpoint), models.ref, mesh, state_sh.ref, init_rng)
    reward = None
    if models.reward is not None:
        reward = common.initial_params(stage_view(config, config.reward_checkpoint), models.reward, mesh,
                                       state_sh.reward, init_rng)

    def scalar_model(lm_params):  # unembedding dropped, fresh value head (Stiennon et al. init)
        return lm_params_to_scalar(lm_params, head_rng, models.ref.config.d_model)

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 — actor/critic must not alias frozen params
    jit = functools.partial(jax.jit, compiler_options=common.compiler_options(config))
    if config.critic == "shared":  # LM head kept, value head added on the same trunk
        actor = jit(lambda p: {**copy(p), "value_head": scalar_model(p)["value_head"]},
                    out_shardings=state_sh.actor)(ref)
    else:
        actor = jit(copy, out_shardings=state_sh.actor)(ref)
    critic = None
    if models.critic is not None:
        from_rm = config.critic_init == "reward"
        critic = jit(copy if from_rm else scalar_model, out_shardings=state_sh.critic)(reward if from_rm else ref)
    make = functools.partial(create_state, optimizers=optimizers, kl_coef=config.kl.coef, ema=config.ema_decay > 0)
    return jit(lambda a, c, r, w, k: make(a, c, r, w, rng=k), out_shardings=state_sh)(
        actor, critic, ref, reward, state_rng)


def abstract_state(models: Models, optimizers: Optimizers, state_sh: PPOState, config) -> PPOState:
    """Shapes of the state (no parameters materialised): the checkpoint restore target."""
    def shapes(model):
        return None if model is None else jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))

    shaped = jax.eval_shape(
        lambda a, c, r, w: create_state(a, c, r, w, optimizers, config.kl.coef, jax.random.PRNGKey(0),
                                        config.ema_decay > 0),
        shapes(models.actor), shapes(models.critic), shapes(models.ref), shapes(models.reward))
    return checkpoint_lib.abstract_tree(shaped, state_sh)


def state_items(state: PPOState) -> dict:
    """Checkpoint items: "params" = the actor (what evaluation / export loads) and "train" = the rest."""
    return {"params": state.actor, "train": state.replace(actor=None)}


def state_from_items(items: Mapping[str, Any]) -> PPOState:
    return items["train"].replace(actor=items["params"])


# ----------------------------------------------------------------------------------------------
# Data: prompts and the ptx stream (checkpointable iterators)
# ----------------------------------------------------------------------------------------------
class SyntheticPrompts:
    """Random-token prompts of random length, left-padded; batch s is a pure function of (seed, s).

    For standalone runs without data. Tokens avoid `reserved` ids (pad, EOS). Each process gets
    its contiguous slice of the global batch; the position (batches drawn) is the iterator state.
    """

    def __init__(self, batch_size: int, prompt_len: int, min_len: int, vocab_size: int, reserved, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.batch_size, self.prompt_len, self.min_len, self.seed = batch_size, prompt_len, min_len, seed
        self.choices = np.array([t for t in range(vocab_size) if t not in set(reserved)], np.int32)
        per_process = batch_size // process_count
        self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, 1, self.position])
        self.position += 1
        ids = rng.choice(self.choices, size=(self.batch_size, self.prompt_len)).astype(np.int32)
        lengths = rng.integers(self.min_len, self.prompt_len + 1, size=self.batch_size)
        mask = (np.arange(self.prompt_len)[None, :] >= self.prompt_len - lengths[:, None]).astype(np.int32)
        index = (self.position - 1) * self.batch_size + np.arange(self.batch_size)
        batch = {"prompt_ids": ids * mask, "prompt_mask": mask, "index": index.astype(np.int32)}
        return {key: value[self.rows] for key, value in batch.items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: Mapping) -> None:
        self.position = int(state["position"])


class SyntheticText:
    """LM batches of counting sequences (a, a+1, a+2, ... mod vocab): a learnable stand-in corpus for
    standalone PPO-ptx runs. Batch s is a pure function of (seed, s); process-sliced like prompts."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, low: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.batch_size, self.seq_len, self.vocab_size, self.low, self.seed = batch_size, seq_len, vocab_size, low, seed
        per_process = batch_size // process_count
        self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, 2, self.position])
        self.position += 1
        span = self.vocab_size - self.low
        start = rng.integers(0, span, size=(self.batch_size, 1))
        ids = (self.low + (start + np.arange(self.seq_len)[None, :]) % span).astype(np.int32)
        ones = np.ones_like(ids)
        return {key: value[self.rows] for key, value in
                {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}.items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: Mapping) -> None:
        self.position = int(state["position"])


def load_tokenizer(config, models: Models):
    """The run's tokenizer (config.data.tokenizer, else the one recorded with the SFT checkpoint, else its
    HF dir), checked against the model's vocabulary and the configured EOS / pad ids."""
    from rlhf_jax.data import chat

    tokenizer = common.load_tokenizer(common.tokenizer_path(stage_view(config, config.actor_checkpoint)))
    common.check_vocab(models.actor, tokenizer)
    for key, expected in (("eos_id", chat.eos_id(tokenizer)), ("pad_id", chat.pad_id(tokenizer))):
        if config.rollout[key] != expected:
            raise ValueError(f"config.rollout.{key}={config.rollout[key]} but the tokenizer's is {expected}")
    return tokenizer


def make_data(config, workdir: str, tokenizer=None):
    """(prompt iterator, ptx iterator or None): files through rlhf_jax.data, else synthetic streams."""
    pid, nproc = jax.process_index(), jax.process_count()
    cache_dir = config.data.cache_dir or str(pathlib.Path(workdir) / "data")
    if config.data.prompts:
        split = data_lib.load_split("prompts", config.data.prompts, tokenizer, max_len=config.rollout.prompt_len,
                                    batch_format="prompts", template=config.data.template, data_dir=cache_dir)
        prompts = split.iterator(config.rollout.batch_size, config.seed)
    else:
        prompts = SyntheticPrompts(config.rollout.batch_size, config.rollout.prompt_len, config.data.min_prompt_len,
                                   config.model.vocab_size, (config.rollout.pad_id, config.rollout.eos_id),
                                   config.seed, pid, nproc)
    ptx = None
    if config.ptx.coef and config.data.ptx:
        split = data_lib.load_split("text", config.data.ptx, tokenizer, max_len=config.ptx.seq_len, data_dir=cache_dir)
        ptx = split.iterator(config.ptx.batch_size, config.seed + 1)
    elif config.ptx.coef:
        low = max(config.rollout.pad_id, config.rollout.eos_id) + 1
        ptx = SyntheticText(config.ptx.batch_size, config.ptx.seq_len, config.model.vocab_size, low, config.seed,
                            pid, nproc)
    return prompts, ptx


# ----------------------------------------------------------------------------------------------
# Gold scoring (host callback, e.g. the built-in task's hidden judge)
# ----------------------------------------------------------------------------------------------
GoldScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _global_numpy(x) -> np.ndarray:
    """All rows of a batch-sharded array (or this process's host rows) on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gold_mean(gold_scorer: GoldScorer, index: np.ndarray, outputs: Mapping[str, jax.Array]) -> float:
    """Mean gold score of the rollout's responses; rows with index -1 (padding) are skipped."""
    index = _global_numpy(index)
    tokens, mask = _global_numpy(outputs["tokens"]), _global_numpy(outputs["mask"])
    keep = index >= 0
    scores = np.asarray(gold_scorer(index[keep], tokens[keep], mask[keep]), np.float64)
    return float(scores.mean()) if scores.size else float("nan")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def kl_blew_up(kl: float, threshold: float) -> bool:
    """KL blow-up: the mean sequence KL to the reference is above `config.kl.blowup_threshold`, or not
    finite (a NaN KL means the policy or reference produced NaN log-probs)."""
    return not math.isfinite(kl) or kl > threshold


def kl_blowup_message(step: int, kl: float, threshold: float) -> str:
    return (f"{'!' * 8} KL BLOW-UP at PPO step {step}: kl={kl:.4g} nats > config.kl.blowup_threshold={threshold:g}. "
            f"The policy is running away from the reference: lower the actor learning rate or raise config.kl.coef "
            f"(metric kl/blowup=1) {'!' * 8}")


def jit_iteration(models: Models, settings: PPOSettings, optimizers: Optimizers, state_sh: PPOState, mesh,
                  with_ptx: bool, options: Optional[dict] = None):
    """The iteration under `jax.jit` with explicit in/out shardings; the state is donated.
    `options`: XLA compiler options (`common.compiler_options`)."""
    batch_sh = sharding.batch_sharding(mesh)
    iteration = make_iteration(models, settings, optimizers.actor, optimizers.critic, optimizers.lr_schedule,
                               batch_sh)
    prompts_sh = {"prompt_ids": batch_sh, "prompt_mask": batch_sh}
    ptx_sh = {"input_ids": batch_sh, "attention_mask": batch_sh, "loss_mask": batch_sh} if with_ptx else None
    rep = sharding.replicated(mesh)
    return jax.jit(iteration, in_shardings=(state_sh, prompts_sh, ptx_sh),
                   out_shardings=(state_sh, rep, batch_sh), donate_argnums=(0,), compiler_options=options)


def _device_batches(prompts: Mapping, ptx: Optional[Mapping], mesh):
    device_prompts = sharding.shard_batch({k: prompts[k] for k in ("prompt_ids", "prompt_mask")}, mesh)
    device_ptx = None if ptx is None else sharding.shard_batch(
        {k: ptx[k] for k in ("input_ids", "attention_mask", "loss_mask")}, mesh)
    return device_prompts, device_ptx


def _abstract_batches(config, mesh):
    """Global ShapeDtypeStructs of one prompt (and ptx) batch, for ahead-of-time compilation."""
    batch_sh = sharding.batch_sharding(mesh)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
    prompts = {k: spec(config.rollout.batch_size, config.rollout.prompt_len) for k in ("prompt_ids", "prompt_mask")}
    ptx = None
    if config.ptx.coef:
        ptx = {k: spec(config.ptx.batch_size, config.ptx.seq_len) for k in ("input_ids", "attention_mask", "loss_mask")}
    return prompts, ptx


def _memory_report(compiled) -> str:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 — not every backend reports memory
        return "memory analysis unavailable"
    if stats is None:
        return "memory analysis unavailable"
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return (f"arguments {mib(stats.argument_size_in_bytes)}, outputs {mib(stats.output_size_in_bytes)}, "
            f"temporaries {mib(stats.temp_size_in_bytes)}, generated code {mib(stats.generated_code_size_in_bytes)}")


@dataclasses.dataclass
class PPOResult:
    state: PPOState
    step: int
    preempted: bool
    last_row: dict
    models: Models


def train(config, workdir: str, *, gold_scorer: Optional[GoldScorer] = None, prompt_source: Optional[Iterator] = None,
          ptx_source: Optional[Iterator] = None) -> PPOResult:
    """Run PPO from `config` in `workdir` (resuming from its newest checkpoint if any).

    `gold_scorer(index [B], tokens [B, N], mask [B, N]) -> [B]` (host numpy) adds `gold/mean`;
    `prompt_source` / `ptx_source` replace the configured data (iterators yielding this
    process's numpy batches, with `get_state()` / `set_state()` for exact resume).
    """
    mesh = common.setup_run(config, workdir, validate=lambda shape: validate_config(config, shape))
    models = build_models(config)
    validate_models(config, models)
    settings = settings_from_config(config, reward_norm_from_checkpoint(config.reward_checkpoint))
    optimizers = make_optimizers(config, models)
    state_sh = state_shardings(models, optimizers, mesh, ema=config.ema_decay > 0)

    tokenizer = load_tokenizer(config, models) if (config.data.prompts or config.data.ptx) else None
    prompts_it, ptx_it = make_data(config, workdir, tokenizer)
    prompts_it = prompt_source or prompts_it
    ptx_it = ptx_source or ptx_it

    # ---- resume or initialise ---------------------------------------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", 
                                               max_to_keep=config.checkpoint.max_to_keep)
    target = abstract_state(models, optimizers, state_sh, config)
    restored = checkpointer.restore(state_items(target))
    if restored is None:
        state, resume_step = initial_state(config, models, optimizers, state_sh, mesh), None
    else:
        state, resume_step = state_from_items(restored.items), restored.step
        prompts_it.set_state(restored.meta["prompt_data"])
        if ptx_it is not None:
            ptx_it.set_state(restored.meta["ptx_data"])
        logging.info("Resuming PPO from %s/%d", checkpointer.directory, resume_step)
    writer = metrics_lib.MetricWriter(workdir, resume_step=resume_step)

    def meta():
        info = {"model": common.model_meta(models.actor), "stage": "ppo", "prompt_data": prompts_it.get_state()}
        if tokenizer is not None:
            info["tokenizer"] = str(pathlib.Path(tokenizer.name_or_path).absolute())
        if ptx_it is not None:
            info["ptx_data"] = ptx_it.get_state()
        return info

    # ---- compile once, ahead of time --------------------------------------------------------------
    t0 = time.perf_counter()
    if config.profile_phases:
        collect, learn = make_phases(models, settings, optimizers.actor, optimizers.critic, optimizers.lr_schedule,
                                     sharding.batch_sharding(mesh))
        options = common.compiler_options(config)
        collect_jit = jax.jit(collect, compiler_options=options)
        learn_jit = jax.jit(learn, donate_argnums=(0,), compiler_options=options)
    else:
        step_fn = jit_iteration(models, settings, optimizers, state_sh, mesh, ptx_it is not None,
                                common.compiler_options(config))
        step_fn = step_fn.lower(target, *_abstract_batches(config, mesh)).compile()
        logging.info("PPO iteration compiled in %.1fs; %s", time.perf_counter() - t0, _memory_report(step_fn))
    compile_seconds = time.perf_counter() - t0

    # ---- loop ---------------------------------------------------------------------------------------
    step = int(jax.device_get(state.step))
    start_step, last_saved, last_row, preempted = step, checkpointer.latest_step(), {}, False
    bar = metrics_lib.progress_bar(config.num_steps, initial=step, desc="ppo")
    with common.PreemptionGuard() as guard:
        while step < config.num_steps:
            tick = time.perf_counter()
            host_prompts = next(prompts_it)
            host_ptx = None if ptx_it is None else next(ptx_it)
            prompts, ptx = _device_batches(host_prompts, host_ptx, mesh)
            timings = {}
            if config.profile_phases:
                t0 = time.perf_counter()
                batch, metrics, outputs, observed_kl = jax.block_until_ready(collect_jit(state, prompts))
                timings["time/rollout"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                state, metrics = jax.block_until_ready(learn_jit(state, batch, metrics, observed_kl, ptx))
                timings["time/update"] = time.perf_counter() - t0
            else:
                state, metrics, outputs = step_fn(state, prompts, ptx)
            host = {name: metrics_lib.to_scalar(value) for name, value in metrics.items()}
            step += 1
            bar.update(1)
            host["kl/blowup"] = float(kl_blew_up(host["kl"], config.kl.blowup_threshold))
            if host["kl/blowup"]:
                logging.warning(kl_blowup_message(step, host["kl"], config.kl.blowup_threshold))
            diverged = host["nonfinite_streak"] >= config.max_nonfinite_streak
            if diverged:  # log the bad row, keep the last good checkpoint, stop
                writer.write(step, host)
                checkpointer.wait()
                raise common.nonfinite_error(host["nonfinite_streak"], step, last_saved, checkpointer.directory,
                                             "PPO iterations")
            if gold_scorer is not None:
                host["gold/mean"] = gold_mean(gold_scorer, host_prompts["index"], outputs)
            host.update(timings)
            host["time/iteration"] = time.perf_counter() - tick
            if step == start_step + 1:
                host["time/compile"] = compile_seconds

            is_last = step == config.num_steps
            stop = guard.should_stop(step)
            if step % config.log_every == 0 or is_last or stop:
                last_row = writer.write(step, host)
                bar.set_postfix(metrics_lib.short_postfix(last_row, ("reward/mean", "kl", "gold/mean")))
            if is_last or stop or step % config.checkpoint.save_every == 0:
                checkpointer.save(step, state_items(state), meta())
                last_saved = step
            if stop and not is_last:
                preempted = True
                break
        checkpointer.wait()  # still under the guard: a signal now cannot kill a save half-way
    bar.close()
    writer.close()
    if preempted:
        print(f"Preempted ({guard.signal_name}) at step {step}: checkpoint {checkpointer.directory}/{step} saved; "
              f"rerun the same command to resume.", flush=True)
    checkpointer.close()
    return PPOResult(state=state, step=step, preempted=preempted, last_row=last_row, models=models)
