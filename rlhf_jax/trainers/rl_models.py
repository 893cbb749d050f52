"""The RL stage's four roles (InstructGPT stage 3): their Linen modules from the config and the
earlier stages' metadata, the optimizers, the starting state, and the checkpoint items.

Actor and reference start from SFT, reward model and critic from the RM (`config.actor / reference /
critic / reward`, each with an `init` section). With `config.actor.lora` the state holds the actor's
adapters only and the reference is the adapter-free actor on the one frozen base; with
`config.actor.lora.quantize` (QLoRA) that base is stored int8 / nf4 (`lora.quantize_base`) and the
reference is `lora.base_model` on it, so its log-probs are the quantised base's (within the format's
error of the fp32 SFT model; the actor starts exactly at its reference). A LoRA critic over the RM
with `config.critic.lora.quantize` makes the RM score through that critic's quantised base (one
copy). Frozen bases held only as LoRA bases are left out of checkpoints and re-read on resume.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import algorithms, loading, lora, optim, sharding
from rlhf_jax.algorithms import Models, Optimizers, RLState
from rlhf_jax.models import Transformer, lm_params_to_scalar
from rlhf_jax.trainers import setup
from rlhf_jax.trainers.rl_config import penalty_coef, reference_init, uses_critic

# ----------------------------------------------------------------------------------------------
# Models and starting weights (actor and reference from SFT, reward model and critic from the RM)
# ----------------------------------------------------------------------------------------------
def build_models(config) -> Models:
    """The four roles' modules (no weights) from the config and the earlier stages' metadata;
    dropout is off in PPO."""
    model_cfg = {**config.model.to_dict(), "dropout_rate": 0.0}
    arch = functools.partial(loading.architecture, model_cfg=model_cfg)
    for role, init, head, what in (("actor", config.actor.init, "lm", "a language model (an SFT run)"),
                                   ("reference", reference_init(config), "lm", "a language model (an SFT run)"),
                                   ("reward", config.reward.init, "value", "a reward model (experiments/train_rm.py)")):
        if init.source == "checkpoint":
            key = f"config.{'actor' if init is config.actor.init else role}.init.path"
            heads = loading.stage_meta(init.path, key)["model"]["heads"]
            if head not in heads:
                raise ValueError(f"{key}={init.path!r} holds a model with heads {tuple(heads)}, not {what}")
    actor_lm = arch(config.actor.init, heads=("lm",), key="config.actor.init")
    ref = arch(reference_init(config), heads=("lm",), key="config.reference.init")
    reward = None
    if config.reward.init.source != "none":
        reward = arch(config.reward.init, heads=("value",), key="config.reward.init")
    critic = None
    if uses_critic(config) and config.critic.type != "shared":
        source = config.critic.init.source
        if source in ("actor", "reward"):
            critic = Transformer((reward if source == "reward" else actor_lm).config, heads=("value",))
        else:
            critic = arch(config.critic.init, heads=("value",), key="config.critic.init")
    critic_spec, critic_base = None, ""
    if critic is not None:
        critic_spec = lora.LoraSpec.from_config(config.critic.lora, "config.critic.lora", ("value_head",))
    if critic_spec is not None:  # adapters + value head over the frozen RM or the actor's starting weights
        critic = lora.lora_model(critic, critic_spec, train=False)
        critic_base = "reward" if config.critic.init.source == "reward" else "ref"
        if critic_base == "reward":  # QLoRA critic: the RM reads the same quantised base (one copy)
            reward = lora.base_model(reward, critic_spec)
    heads = ("lm", "value") if uses_critic(config) and config.critic.type == "shared" else ("lm",)
    actor, spec = Transformer(actor_lm.config, heads=heads), actor_lora_spec(config)
    if spec is not None:
        actor = lora.lora_model(actor, spec, train=False)  # no adapter dropout: rollout and update agree
        ref = lora.base_model(ref, spec)  # QLoRA: the reference reads the actor's quantised base
    return Models(actor=actor, ref=ref, critic=critic, reward=reward, actor_lora=spec, critic_lora=critic_spec,
                  critic_base=critic_base)


def actor_lora_spec(config) -> lora.LoraSpec | None:
    """config.actor.lora as a spec (None when off); a shared value head is trained with the adapters."""
    shared = uses_critic(config) and config.critic.type == "shared"
    return lora.LoraSpec.from_config(config.actor.lora, "config.actor.lora", ("value_head",) if shared else ())


def quantizer(models: Models, role: str) -> Optional[Transformer]:
    """The QLoRA model whose `lora.quantize_base` stores frozen `role`'s weights ("ref": the actor's
    base; "reward": a LoRA critic's base), or None when that role is held in fp32."""
    if role == "ref" and models.actor_lora is not None and models.actor_lora.quantized:
        return models.actor
    if role == "reward" and models.critic_base == "reward" and models.critic_lora.quantized:
        return models.critic
    return None


def init_keys(config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init_rng, head_rng, state_rng) of a run: scratch / HF weights, fresh value heads and adapters,
    the state's own RNG. Every read of a role's starting weights uses the same init_rng."""
    return tuple(jax.random.split(jax.random.PRNGKey(config.seed), 3))


def frozen_params(config, models: Models, role: str, state_sh: RLState, options: Optional[dict] = None) -> Any:
    """Starting weights of the frozen `role` ("ref" or "reward") from its init section, on its
    shardings in `state_sh`: `loading.initial_params`, quantised in place of the fp32 copy when a
    QLoRA role reads them (`quantizer`)."""
    init, key = ((reference_init(config), "config.reference.init") if role == "ref" else
                 (config.reward.init, "config.reward.init"))
    rng, param_sh = init_keys(config)[0], getattr(state_sh, role)
    model, quantizing = getattr(models, role), quantizer(models, role)
    if quantizing is None:
        return loading.initial_params(init, model, param_sh, rng, options, key)
    plain = Transformer(model.config, heads=("lm",) if role == "ref" else ("value",))
    mesh = jax.tree.leaves(param_sh)[0].mesh
    fp32 = loading.initial_params(init, plain, sharding.param_shardings(plain, mesh), rng, options, key)
    return jax.jit(lambda p: lora.quantize_base(quantizing, p), out_shardings=param_sh, donate_argnums=(0,),
                   compiler_options=options)(fp32)


def reread_roles(models: Models) -> tuple[str, ...]:
    """The frozen roles left out of checkpoints and read again (`frozen_params`) on resume: "ref"
    under a LoRA actor (the base it reads), "reward" under a QLoRA critic over the RM (quantised)."""
    return ("ref",) * (models.actor_lora is not None) + ("reward",) * (quantizer(models, "reward") is not None)


def make_optimizers(config, models: Models) -> Optimizers:
    """AdamW per trained network; schedules count optimizer updates (epochs x minibatches each iteration)."""
    updates = config.num_steps * config.ppo.epochs * config.ppo.num_minibatches
    actor_opt, schedule = optim.make_optimizer(config.actor.optim, updates)
    critic_opt = None if models.critic is None else optim.make_optimizer(config.critic.optim, updates)[0]
    return Optimizers(actor=actor_opt, critic=critic_opt, lr_schedule=schedule)


def initial_state(config, models: Models, optimizers: Optimizers, state_sh: RLState) -> RLState:
    """Reference and actor from their init sections (the actor a copy of the reference when they
    share one), RM params, critic from the RM or the actor (trunk copied, unembedding dropped,
    fresh value head) or its own init; optimizer moments created sharded."""
    init_rng, head_rng, state_rng = init_keys(config)
    options = setup.compiler_options(config)
    lm_actor = Transformer(models.actor.config, heads=("lm",))
    ref = frozen_params(config, models, "ref", state_sh, options)
    reward = None if models.reward is None else frozen_params(config, models, "reward", state_sh, options)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 — actor/critic must not alias frozen params
    jit = functools.partial(jax.jit, compiler_options=options)
    if config.reference.init.source == "actor":
        start = ref
    else:
        lm_sh = sharding.param_shardings(lm_actor, jax.tree.leaves(state_sh.ref)[0].mesh)
        start = loading.initial_params(config.actor.init, lm_actor, lm_sh, init_rng, options, "config.actor.init")

    def scalar_model(lm_params):  # unembedding dropped, fresh value head (Stiennon et al. init)
        return lm_params_to_scalar(lm_params, head_rng, models.actor.config.d_model)

    if models.actor_lora is not None:  # adapters (+ a shared value head) only; the base stays in `ref`
        def lora_actor(p):
            full = {**p, "value_head": scalar_model(p)["value_head"]} if "value" in models.actor.heads else p
            adapters = lora.init_adapters(models.actor, full, jax.random.fold_in(head_rng, 1))
            return lora.split(lora.combine(adapters, full), models.actor_lora)[0]
        actor = jit(lora_actor, out_shardings=state_sh.actor)(start)
    elif "value" in models.actor.heads:  # shared critic: LM head kept, value head added on the same trunk
        actor = jit(lambda p: {**copy(p), "value_head": scalar_model(p)["value_head"]},
                    out_shardings=state_sh.actor)(start)
    else:
        actor = jit(copy, out_shardings=state_sh.actor)(start)
    critic = None
    if models.critic_lora is not None:  # adapters + value head (the RM's, or fresh) only; the base is read in place
        def lora_critic(base):
            full = {**base, "value_head": copy(base["value_head"]) if "value_head" in base else
                    scalar_model(base)["value_head"]}
            adapters = lora.init_adapters(models.critic, full, jax.random.fold_in(head_rng, 2))
            return lora.split(lora.combine(adapters, full), models.critic_lora)[0]
        critic = jit(lora_critic, out_shardings=state_sh.critic)(reward if models.critic_base == "reward" else ref)
    elif models.critic is not None:
        source = config.critic.init.source
        if source == "reward":
            critic = jit(copy, out_shardings=state_sh.critic)(reward)
        elif source == "actor":  # a QLoRA actor's base dequantised: the weights the actor starts from
            plain = (lambda p: lora.merge(p, models.actor_lora)) if quantizer(models, "ref") else (lambda p: p)
            critic = jit(lambda p: scalar_model(plain(p)), out_shardings=state_sh.critic)(start)
        else:
            critic = loading.initial_params(config.critic.init, models.critic, state_sh.critic, head_rng, options,
                                            "config.critic.init")
    make = functools.partial(algorithms.create_state, optimizers=optimizers, kl_coef=config.kl.coef,
                             ema=config.ema_decay > 0, penalty_coef=penalty_coef(config))
    return jit(lambda a, c, r, w, k: make(a, c, r, w, rng=k), out_shardings=state_sh)(
        actor, critic, ref, reward, state_rng)


def state_items(state: RLState, with_ref: bool = True, with_reward: bool = True) -> dict:
    """Checkpoint items: "params" = the actor (what evaluation / export loads) and "train" = the rest;
    `with_ref=False` (LoRA actor) / `with_reward=False` (a QLoRA critic's quantised RM) leave out
    that frozen base, re-read from its init on resume."""
    return {"params": state.actor, "train": state.replace(actor=None, ref=state.ref if with_ref else None,
                                                          reward=state.reward if with_reward else None)}


def state_from_items(items: Mapping[str, Any]) -> RLState:
    return items["train"].replace(actor=items["params"])


def compiles_ahead(models: Models) -> bool:
    """False when a frozen base holds nf4 codes: XLA:CPU places 4-bit arrays unpacked (a byte each),
    while a program compiled ahead from abstract shapes expects them packed and refuses them; plain
    jit dispatch compiles for the arrays' own layouts at the first call."""
    specs = (models.actor_lora if quantizer(models, "ref") else None,
             models.critic_lora if quantizer(models, "reward") else None)
    return not any(spec is not None and spec.quantize == "nf4" for spec in specs)
