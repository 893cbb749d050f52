"""Settings, models, state and experience of the on-device RL iteration.

Roles (DeepSpeed-Chat conventions): the actor starts from the SFT model; the reference is frozen
(params only); the reward model is frozen; the critic is a separate scalar-head network with one
value per token, or a value head on the actor trunk (`critic="shared"`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import generation, loading, lora, optim, sharding
from rlhf_jax.algorithms import catalog
from rlhf_jax import rewards as rewards_lib
from rlhf_jax.models import Transformer

@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The algorithm and its hyperparameters; the jitted iteration closes over them (static:
    changing one recompiles). `catalog.ALGORITHMS` names the usual combinations.

    The algorithm is four explicit choices:
    - `advantage`: "gae" — per-token rewards (−β·KL per token, the score at the last token) and
      GAE(γ, λ) over per-token values (Schulman et al. 2016; InstructGPT / DeepSpeed-Chat);
      "sequence" — one reward per response minus one value per response (early ColossalChat);
      "grpo" / "dr_grpo" / "rloo" — outcome advantages from `group_size` responses per prompt
      (`rl.group_advantages`) on every response token; "reinforce_pp" — returns of the per-token
      KL-shaped rewards without a critic, whitened over the batch (Hu 2025), "reinforce_pp_baseline"
      the same after subtracting the group mean score; "remax" — returns minus the score of the
      greedy response to the same prompt (Li et al. 2023; a second, greedy rollout in the program).
    - `critic`: a "separate" network with its own optimizer, a "shared" value head on the actor
      trunk (loss = policy loss + vf_coef · value loss), or "none".
    - `policy_loss`: "clip" (PPO, with optional clip-higher `clip_eps_high` and `dual_clip`),
      "penalty" (PPO-penalty: ratio · A − β_pen · KL(π_old‖π_θ), β_pen adapted after each
      iteration, Schulman et al. 2017 §4), "gspo" (sequence-level ratio, Zheng et al. 2025);
      aggregated over tokens by `loss_agg_mode` (verl's names).
    - `kl_in`: where the KL to the reference goes: "reward" (−β·(log π − log π_ref) per token,
      `rl.kl_penalized_rewards`), "loss" (+β · aggregated `kl_estimator` term, GRPO) or "none";
      β fixed or adaptive (Ziegler et al. 2019).
    PPO-ptx adds ptx_coef · LM loss (Ouyang et al. 2022, eq. 2).
    """

    sampling: generation.SamplingConfig
    advantage: str = "gae"
    critic: str = "separate"
    policy_loss: str = "clip"
    kl_in: str = "reward"
    loss_agg_mode: str = "token-mean"
    group_size: int = 1
    epochs: int = 1
    num_minibatches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_adaptive: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    penalty_target: float = 0.01
    filter_groups: bool = False
    overlong_buffer: int = 0
    score_clip: Optional[float] = None
    rm_weight: float = 0.0
    reward_norm: tuple = (0.0, 1.0)  # RM score = (raw − mean) / std, stored with the RM
    rules: tuple = ()  # ((name, ((key, value), ...)), ...): hashable form of config.rewards.rules
    ptx_coef: float = 0.0
    ema_decay: float = 0.0

    def __post_init__(self):
        for name, allowed in (("advantage", catalog.ADVANTAGES), ("critic", catalog.CRITICS),
                              ("policy_loss", catalog.POLICY_LOSSES), ("kl_in", catalog.KL_PLACEMENTS),
                              ("loss_agg_mode", catalog.LOSS_AGG_MODES), ("kl_estimator", ("k1", "k3"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RLSettings.{name}={getattr(self, name)!r} (allowed: {allowed})")
        if (self.critic == "none") != (self.advantage not in ("gae", "sequence")):
            raise ValueError(f"RLSettings: advantage={self.advantage!r} with critic={self.critic!r}: GAE and the "
                             "sequence critic need a critic, the other estimators none")
        if self.advantage in catalog.GROUP_ADVANTAGES and self.group_size < 2:
            raise ValueError(f"RLSettings: advantage={self.advantage!r} needs group_size >= 2, got {self.group_size}")

    @property
    def temperature(self) -> float:
        return self.sampling.temperature or 1.0

    @property
    def updates_per_iteration(self) -> int:
        return self.epochs * self.num_minibatches

    def rule_reward(self) -> Callable:
        return rewards_lib.make_rule_reward({name: dict(entry) for name, entry in self.rules}, self.sampling.eos_id)


@dataclasses.dataclass(frozen=True)
class Models:
    """The Linen modules (parameters live in `RLState`). `critic`/`reward` are None when absent."""

    actor: Transformer  # heads ("lm",), or ("lm", "value") with a shared critic
    ref: Transformer  # heads ("lm",): the frozen reference policy
    critic: Optional[Transformer]  # heads ("value",)
    reward: Optional[Transformer]  # heads ("value",): the frozen reward model
    # LoRA actor (config.actor.lora): `actor` is a `lora.lora_model`, `RLState.actor` holds its
    # adapters (and a shared value head) only, and the frozen rest is `RLState.ref`: the reference
    # is the adapter-free actor, with no second copy of the base weights (`actor_params`). With
    # QLoRA (`actor_lora.quantized`) `RLState.ref` is the quantised base and `ref` is
    # `lora.base_model` reading it (`trainers.rl_models.quantizer`; the RM alike under a QLoRA critic).
    actor_lora: Optional[lora.LoraSpec] = None
    # LoRA critic (config.critic.lora, a separate critic): `critic` is a `lora.lora_model`,
    # `RLState.critic` holds its adapters and value head only, over the frozen weights it started
    # from, read in place: `critic_base` "reward" (`RLState.reward`) or "ref" (`RLState.ref`, the
    # actor's starting weights; the unused LM head is ignored): `critic_params`.
    critic_lora: Optional[lora.LoraSpec] = None
    critic_base: str = ""


def actor_params(models: Models, trainable: Any, ref: Any) -> Any:
    """The actor's whole parameter tree: `trainable` itself, or with LoRA `lora.combine(trainable, ref)`."""
    return trainable if models.actor_lora is None else lora.combine(trainable, ref)


def actor_trained(models: Models, tree: Any) -> Any:
    """The part of an actor-shaped tree (shapes, shardings) that `RLState.actor` holds."""
    return tree if models.actor_lora is None else lora.split(tree, models.actor_lora)[0]


def critic_params(models: Models, trainable: Any, state: "RLState") -> Any:
    """The critic's whole parameter tree: `trainable`, or with LoRA the adapters and value head over
    the frozen base (`Models.critic_base`)."""
    if models.critic_lora is None:
        return trainable
    return lora.combine(trainable, state.reward if models.critic_base == "reward" else state.ref)


def critic_trained(models: Models, tree: Any) -> Any:
    """The part of a critic-shaped tree (shapes, shardings) that `RLState.critic` holds."""
    return tree if models.critic_lora is None else lora.split(tree, models.critic_lora)[0]


@dataclasses.dataclass(frozen=True)
class Optimizers:
    actor: optax.GradientTransformation
    critic: Optional[optax.GradientTransformation]
    lr_schedule: Callable  # the actor's, in optimizer updates


@flax.struct.dataclass
class RLState:
    """Everything an exact resume needs. `critic*` are None with a shared value head, `reward`
    without a reward model, `ema` without EMA. `rng` is a raw uint32[2] key; iteration s uses
    fold_in(rng, s). `nonfinite_steps`/`nonfinite_streak` count iterations in which some update
    was skipped for a non-finite loss or gradient (total / consecutive). `kl_coef` is β of the KL
    to the reference (in the reward or the loss)."""

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
    penalty_coef: Any = None  # PPO-penalty's β_pen (scalar fp32); None for the other losses


@flax.struct.dataclass
class Experience:
    """One batch of experience, rows aligned. Prompts `[B, P]` left-padded, responses `[B, N]`;
    response token t is predicted at sequence position P−1+t, where its value V_t is read.
    `values`/`returns`/`value_mask` are `[B, N]` for per-token advantages and `[B, 1]` for
    `advantage="sequence"`. Log-probs are fp32 under the temperature-scaled policy."""

    seq_ids: jax.Array  # [B, P+N] prompt then response
    seq_mask: jax.Array  # [B, P+N]
    tokens: jax.Array  # [B, N] response
    mask: jax.Array  # [B, N] 1 up to and including EOS
    loss_mask: jax.Array  # [B, N] tokens the policy loss sees: `mask`, less filtered groups (DAPO)
    scores: jax.Array  # [B] total score of each response (rules + RM), before KL shaping
    kl: jax.Array  # [B] sequence KL to the reference, sum_t (log pi - log pi_ref) (k1)
    logprobs: jax.Array  # [B, N] old policy
    ref_logprobs: jax.Array  # [B, N] reference policy
    advantages: jax.Array  # [B, N] (whitened when configured)
    values: jax.Array  # old values
    returns: jax.Array
    value_mask: jax.Array


def state_shardings(models: Models, optimizers: Optimizers, mesh, ema: bool, penalty: bool = False) -> RLState:
    """RLState of NamedShardings: params by their logical axes, optimizer moments alike, scalars replicated."""
    rep = sharding.replicated(mesh)
    actor_sh = actor_trained(models, sharding.param_shardings(models.actor, mesh))
    critic_sh = None if models.critic is None else critic_trained(models, sharding.param_shardings(models.critic, mesh))
    return RLState(
        step=rep, actor=actor_sh,
        actor_opt=optim.opt_state_shardings(optimizers.actor, actor_trained(models, loading.param_shapes(models.actor)),
                                            actor_sh, mesh),
        critic=critic_sh,
        critic_opt=None if critic_sh is None else optim.opt_state_shardings(
            optimizers.critic, critic_trained(models, loading.param_shapes(models.critic)), critic_sh, mesh),
        ref=sharding.param_shardings(models.ref, mesh),
        reward=None if models.reward is None else sharding.param_shardings(models.reward, mesh),
        ema=actor_sh if ema else None, kl_coef=rep, rng=rep, nonfinite_steps=rep, nonfinite_streak=rep,
        penalty_coef=rep if penalty else None)


def create_state(actor, critic, ref, reward, optimizers: Optimizers, kl_coef: float, rng, ema: bool,
                 penalty_coef: Optional[float] = None) -> RLState:
    """Fresh state (traceable: jit it with out_shardings so optimizer moments are born sharded)."""
    zero = jnp.zeros((), jnp.int32)
    return RLState(step=zero, actor=actor, actor_opt=optimizers.actor.init(actor), critic=critic,
                   critic_opt=None if critic is None else optimizers.critic.init(critic), ref=ref, reward=reward,
                   ema=jax.tree.map(jnp.copy, actor) if ema else None, kl_coef=jnp.asarray(kl_coef, jnp.float32),
                   rng=rng, nonfinite_steps=zero, nonfinite_streak=zero,
                   penalty_coef=None if penalty_coef is None else jnp.asarray(penalty_coef, jnp.float32))


def abstract_state(models: Models, optimizers: Optimizers, state_sh: RLState, kl_coef: float, ema: bool,
                   penalty_coef: Optional[float] = None) -> RLState:
    """Shapes of the state with its shardings (nothing materialised): the checkpoint restore target."""
    shapes = lambda model: None if model is None else loading.param_shapes(model)  # noqa: E731
    shaped = jax.eval_shape(
        lambda a, c, r, w: create_state(a, c, r, w, optimizers, kl_coef, jax.random.PRNGKey(0), ema, penalty_coef),
        actor_trained(models, shapes(models.actor)), None if models.critic is None else critic_trained(
            models, shapes(models.critic)), shapes(models.ref), shapes(models.reward))
    return checkpoint_lib.abstract_tree(shaped, state_sh)
