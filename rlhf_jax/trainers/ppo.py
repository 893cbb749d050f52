"""PPO / PPO-ptx trainer (InstructGPT stage 3): config -> models, state, data -> the one loop.

    from rlhf_jax.trainers import ppo
    result = ppo.train(config, workdir)          # configs/ppo.py; resumes from WORKDIR/checkpoints

The iteration itself (rollout -> update, one jitted program on device) is `rlhf_jax.algorithms`;
this module is the host side: config checks that name the key, the four roles' models and
starting weights (`config.actor / reference / critic / reward`, each with an `init` section),
prompts and ptx data, gold scoring and the KL blow-up check as loop hooks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import algorithms, generation, loading, optim, sharding
from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import rewards as rewards_lib
from rlhf_jax.algorithms import Models, Optimizers, RLSettings, RLState
from rlhf_jax.data import rollout_data
from rlhf_jax.data.rollout_data import abstract_batch, iteration_batches, make_data, place_batch
from rlhf_jax.models import Transformer, lm_params_to_scalar
from rlhf_jax.trainers import loop, setup

CRITIC_TYPES = {"token": ("separate", "gae"), "shared": ("shared", "gae"), "sequence": ("separate", "sequence")}
INIT_SOURCES = {"actor": ("scratch", "checkpoint", "hf"), "reference": ("actor", "checkpoint", "hf"),
                "critic": ("actor", "reward", "checkpoint", "hf"), "reward": ("none", "checkpoint", "hf")}


# ----------------------------------------------------------------------------------------------
# Config checks (before anything is built or compiled)
# ----------------------------------------------------------------------------------------------
def validate_config(config, mesh_shape: tuple[int, int, int]) -> None:
    """One-line errors naming the config key, before anything is built or compiled."""
    def fail(message):
        raise ValueError(message)

    setup.validate_positive(config, ("num_steps", "rollout.batch_size", "rollout.prompt_len", "rollout.max_new_tokens",
                                     "log_every", "checkpoint.save_every", "max_nonfinite_streak"))
    if config.rollout.top_k or config.rollout.top_p < 1.0:  # the KL and the ratio would describe another policy
        fail(f"config.rollout.top_k={config.rollout.top_k}, top_p={config.rollout.top_p}: RL samples from and trains "
             "the unfiltered (temperature-scaled) policy; a top-k / top-p filter makes the log-probs, the KL penalty "
             "and the importance ratio describe a policy it did not sample from. Set top_k=0 and top_p=1")
    algorithm = algorithm_of(config)
    if algorithm.grouped and config.algorithm.group_size < 2:
        fail(f"config.algorithm.group_size={config.algorithm.group_size}: {config.algorithm.name} compares "
             "responses to the same prompt, need >= 2")
    if config.algorithm.dual_clip and config.algorithm.dual_clip <= 1:
        fail(f"config.algorithm.dual_clip={config.algorithm.dual_clip}: need > 1 (or 0 = off)")
    if config.critic.type not in CRITIC_TYPES:
        fail(f"config.critic.type={config.critic.type!r} (allowed: {', '.join(map(repr, CRITIC_TYPES))})")
    for role, allowed in INIT_SOURCES.items():
        if role != "critic" or algorithm.critic != "none":
            loading.check_init(config[role].init, f"config.{role}.init", allowed)
    setup.validate_paths(config.data, ("prompts", "tokenizer", "ptx"))
    has_rm = config.reward.init.source != "none"
    if algorithm.critic != "none" and config.critic.init.source == "reward" and config.critic.type != "shared" \
            and not has_rm:
        fail("config.critic.init.source='reward' needs a reward model (config.reward.init) "
             "(or set config.critic.init.source='actor')")
    if config.rewards.rm_weight and not has_rm:
        fail(f"config.rewards.rm_weight={config.rewards.rm_weight} but config.reward.init.source='none': set the RM "
             "(config.reward.init) or --config.rewards.rm_weight=0 (rule rewards only)")
    if not config.rewards.rm_weight and not rewards_lib.active_rules(config.rewards.rules):
        fail("config.rewards: no reward at all (rm_weight=0 and every rule weight is 0)")
    if not config.data.prompts and config.actor.init.source != "scratch":
        fail("config.data.prompts is empty: synthetic prompts are only for a from-scratch actor "
             "(config.actor.init.source='scratch')")
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
    setup.validate_batch("rollout.batch_size", config.rollout.batch_size, mesh_shape,
                         config.ppo.num_minibatches, "ppo.num_minibatches")
    if config.rollout.batch_size % (group_size(config) * jax.process_count()):
        fail(f"config.rollout.batch_size={config.rollout.batch_size} must be a multiple of config.algorithm.group_size"
             f"={group_size(config)} x {jax.process_count()} processes (each prompt's responses are sampled together)")
    if config.ptx.coef:
        setup.validate_batch("ptx.batch_size", config.ptx.batch_size, mesh_shape,
                             config.ppo.num_minibatches, "ppo.num_minibatches")
    if config.actor.init.source == "scratch":
        for key in ("eos_id", "pad_id"):
            if config.rollout[key] >= config.model.vocab_size:
                fail(f"config.rollout.{key}={config.rollout[key]} is outside the vocabulary ({config.model.vocab_size})")
        if config.data.min_prompt_len < 1 or config.data.min_prompt_len > config.rollout.prompt_len:
            fail(f"config.data.min_prompt_len={config.data.min_prompt_len}: need 1..rollout.prompt_len")


def validate_models(config, models: Models) -> None:
    """Checks that need the architectures (known once the earlier stages' metadata is read)."""
    cfg = models.actor.config
    if cfg.positions == "learned":
        setup.validate_sequence_length(config.rollout.prompt_len, config.rollout.max_new_tokens, cfg.max_len,
                                       "config.rollout", "the actor's learned position table")
    for key in ("eos_id", "pad_id"):
        if config.rollout[key] >= cfg.vocab_size:
            raise ValueError(f"config.rollout.{key}={config.rollout[key]} is outside the actor's vocabulary "
                             f"({cfg.vocab_size})")
    for role in ("ref", "critic", "reward"):
        other = getattr(models, role)
        if other is not None and other.config.vocab_size != cfg.vocab_size:
            key = {"ref": "reference"}.get(role, role)
            raise ValueError(f"config.{key}.init: its vocabulary ({other.config.vocab_size}) differs from the "
                             f"actor's ({cfg.vocab_size}); every role must share the tokenizer")


def algorithm_of(config) -> algorithms.Algorithm:
    """The catalog entry named by config.algorithm.name (ValueError naming the key otherwise)."""
    name = config.algorithm.name
    if name not in algorithms.ALGORITHMS:
        raise ValueError(f"config.algorithm.name={name!r} (allowed: {', '.join(map(repr, algorithms.ALGORITHMS))})")
    return algorithms.ALGORITHMS[name]


def group_size(config) -> int:
    """Responses per prompt: config.algorithm.group_size for group algorithms, else 1."""
    return config.algorithm.group_size if algorithm_of(config).grouped else 1


def uses_critic(config) -> bool:
    return algorithm_of(config).critic != "none"


def settings_from_config(config, reward_norm: Mapping[str, float] | None = None) -> RLSettings:
    """Static iteration settings from the ConfigDict: the catalog entry of config.algorithm.name,
    the critic type (algorithms with a critic), hyperparameters; rules validated, -1 eos -> None."""
    rollout, ppo, kl, alg_cfg = config.rollout, config.ppo, config.kl, config.algorithm
    algorithm = algorithm_of(config)
    rules = rewards_lib.active_rules(config.rewards.rules)
    if algorithm.overlong and alg_cfg.overlong_buffer > 0:  # DAPO: soft overlong punishment, weight 1
        rules = {**rules, "overlong": {"weight": 1.0, "buffer": alg_cfg.overlong_buffer}}
    critic, advantage = CRITIC_TYPES[config.critic.type] if algorithm.critic != "none" else ("none", algorithm.advantage)
    whiten = ppo.whiten_advantages if advantage in ("gae", "sequence") else advantage.startswith("reinforce_pp")
    norm = reward_norm or loading.IDENTITY_NORM
    return RLSettings(
        sampling=generation.SamplingConfig(
            max_new_tokens=rollout.max_new_tokens, temperature=float(rollout.temperature), top_k=rollout.top_k,
            top_p=float(rollout.top_p), eos_id=None if rollout.eos_id < 0 else rollout.eos_id,
            pad_id=rollout.pad_id),
        advantage=advantage, critic=critic, policy_loss=algorithm.policy_loss, kl_in=algorithm.kl_in,
        loss_agg_mode=algorithm.loss_agg_mode, group_size=group_size(config), epochs=ppo.epochs,
        num_minibatches=ppo.num_minibatches, clip_eps=ppo.clip_eps,
        clip_eps_high=float(alg_cfg.clip_eps_high) if algorithm.clip_higher else None,
        dual_clip=float(alg_cfg.dual_clip) if alg_cfg.dual_clip else None, value_clip_eps=ppo.value_clip_eps,
        gamma=ppo.gamma, lam=ppo.lam, whiten_advantages=whiten, vf_coef=ppo.vf_coef, entropy_coef=ppo.entropy_coef,
        kl_estimator=alg_cfg.kl_estimator, kl_adaptive=kl.adaptive, kl_target=kl.target, kl_horizon=kl.horizon,
        penalty_target=alg_cfg.penalty_target, filter_groups=algorithm.filter_groups,
        score_clip=config.rewards.score_clip or None, rm_weight=config.rewards.rm_weight,
        reward_norm=(float(norm["mean"]), float(norm["std"])),
        rules=tuple((name, tuple(sorted(entry.items()))) for name, entry in sorted(rules.items())),
        ptx_coef=config.ptx.coef, ema_decay=config.ema_decay)


# ----------------------------------------------------------------------------------------------
# Models and starting weights (actor and reference from SFT, reward model and critic from the RM)
# ----------------------------------------------------------------------------------------------
def reference_init(config):
    """The reference's init section: the actor's unless config.reference.init names its own."""
    return config.actor.init if config.reference.init.source == "actor" else config.reference.init


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
    heads = ("lm", "value") if uses_critic(config) and config.critic.type == "shared" else ("lm",)
    return Models(actor=Transformer(actor_lm.config, heads=heads), ref=ref, critic=critic, reward=reward)


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
    init_rng, head_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    options = setup.compiler_options(config)
    lm_actor = Transformer(models.actor.config, heads=("lm",))
    ref = loading.initial_params(reference_init(config), models.ref, state_sh.ref, init_rng, options,
                                 "config.reference.init")
    reward = None
    if models.reward is not None:
        reward = loading.initial_params(config.reward.init, models.reward, state_sh.reward, init_rng, options,
                                        "config.reward.init")
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 — actor/critic must not alias frozen params
    jit = functools.partial(jax.jit, compiler_options=options)
    if config.reference.init.source == "actor":
        start = ref
    else:
        lm_sh = sharding.param_shardings(lm_actor, jax.tree.leaves(state_sh.ref)[0].mesh)
        start = loading.initial_params(config.actor.init, lm_actor, lm_sh, init_rng, options, "config.actor.init")

    def scalar_model(lm_params):  # unembedding dropped, fresh value head (Stiennon et al. init)
        return lm_params_to_scalar(lm_params, head_rng, models.actor.config.d_model)

    if "value" in models.actor.heads:  # shared critic: LM head kept, value head added on the same trunk
        actor = jit(lambda p: {**copy(p), "value_head": scalar_model(p)["value_head"]},
                    out_shardings=state_sh.actor)(start)
    else:
        actor = jit(copy, out_shardings=state_sh.actor)(start)
    critic = None
    if models.critic is not None:
        source = config.critic.init.source
        if source == "reward":
            critic = jit(copy, out_shardings=state_sh.critic)(reward)
        elif source == "actor":
            critic = jit(scalar_model, out_shardings=state_sh.critic)(start)
        else:
            critic = loading.initial_params(config.critic.init, models.critic, state_sh.critic, head_rng, options,
                                            "config.critic.init")
    make = functools.partial(algorithms.create_state, optimizers=optimizers, kl_coef=config.kl.coef,
                             ema=config.ema_decay > 0, penalty_coef=penalty_coef(config))
    return jit(lambda a, c, r, w, k: make(a, c, r, w, rng=k), out_shardings=state_sh)(
        actor, critic, ref, reward, state_rng)


def penalty_coef(config) -> Optional[float]:
    """PPO-penalty's initial β_pen (None for the other policy losses: no such state)."""
    return config.algorithm.penalty_coef if algorithm_of(config).policy_loss == "penalty" else None


def state_items(state: RLState) -> dict:
    """Checkpoint items: "params" = the actor (what evaluation / export loads) and "train" = the rest."""
    return {"params": state.actor, "train": state.replace(actor=None)}


def state_from_items(items: Mapping[str, Any]) -> RLState:
    return items["train"].replace(actor=items["params"])


# ----------------------------------------------------------------------------------------------
# Tokenizer (the data itself: rlhf_jax.data.rollout_data)
# ----------------------------------------------------------------------------------------------
def load_tokenizer(config, models: Models):
    """The run's tokenizer (config.data.tokenizer, else the one recorded with the actor's checkpoint,
    else its HF dir), checked against the model's vocabulary and the configured EOS / pad ids."""
    from rlhf_jax.data import chat

    tokenizer = loading.load_tokenizer(loading.tokenizer_path(config.data.tokenizer, config.actor.init,
                                                              key="config.actor.init"))
    loading.check_vocab(models.actor, tokenizer, "config.actor.init")
    for key, expected in (("eos_id", chat.eos_id(tokenizer)), ("pad_id", chat.pad_id(tokenizer))):
        if config.rollout[key] != expected:
            raise ValueError(f"config.rollout.{key}={config.rollout[key]} but the tokenizer's is {expected}")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Loop hooks: gold scoring (e.g. the built-in task's hidden judge), KL blow-up
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


def kl_blew_up(kl: float, threshold: float) -> bool:
    """KL blow-up: the mean sequence KL to the reference is above `config.kl.blowup_threshold`, or not
    finite (a NaN KL means the policy or reference produced NaN log-probs)."""
    return not math.isfinite(kl) or kl > threshold


def kl_blowup_message(step: int, kl: float, threshold: float) -> str:
    return (f"{'!' * 8} KL BLOW-UP at PPO step {step}: kl={kl:.4g} nats > config.kl.blowup_threshold={threshold:g}. "
            f"The policy is running away from the reference: lower the actor learning rate or raise config.kl.coef "
            f"(metric kl/blowup=1) {'!' * 8}")


# ----------------------------------------------------------------------------------------------
# The jitted iteration and the run
# ----------------------------------------------------------------------------------------------
def jit_iteration(models: Models, settings: RLSettings, optimizers: Optimizers, state_sh: RLState, mesh,
                  with_ptx: bool, options: Optional[dict] = None):
    """`iteration(state, batch) -> (state, metrics, outputs)` under `jax.jit` with explicit in/out
    shardings, the state donated; `options`: XLA compiler options (`setup.compiler_options`)."""
    batch_sh = sharding.batch_sharding(mesh)
    step = functools.partial(algorithms.iteration, models, settings, optimizers, batch_sharding=batch_sh)
    batch_shs = {"prompts": {k: batch_sh for k in rollout_data.PROMPT_KEYS},
                 "ptx": {k: batch_sh for k in rollout_data.PTX_KEYS} if with_ptx else None}
    return jax.jit(step, in_shardings=(state_sh, batch_shs), out_shardings=(state_sh, sharding.replicated(mesh),
                                                                            batch_sh),
                   donate_argnums=(0,), compiler_options=options)


def timed_phases(models: Models, settings: RLSettings, optimizers: Optimizers, mesh, options: Optional[dict] = None):
    """The same iteration with rollout and update jitted apart (config.profile_phases): adds
    `time/rollout` and `time/update` (seconds, each waited for) to the metrics."""
    batch_sh = sharding.batch_sharding(mesh)
    rollout = jax.jit(lambda s, p: algorithms.rollout(models, settings, s, p, algorithms.iteration_keys(s)[0]),
                      compiler_options=options)
    update = jax.jit(lambda s, e, x: algorithms.update(models, settings, optimizers, s, e, x,
                                                       algorithms.iteration_keys(s)[1], batch_sh),
                     donate_argnums=(0,), compiler_options=options)

    def step(state, batch):
        t0 = time.perf_counter()
        experience, metrics = jax.block_until_ready(rollout(state, batch["prompts"]))
        t1 = time.perf_counter()
        state, update_metrics = jax.block_until_ready(update(state, experience, batch["ptx"]))
        timings = {"time/rollout": t1 - t0, "time/update": time.perf_counter() - t1}
        outputs = {"tokens": experience.tokens, "mask": experience.mask, "scores": experience.scores}
        return state, {**metrics, **update_metrics, **timings}, outputs

    return step


def memory_report(compiled) -> str:
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
class PPOResult(loop.LoopResult):
    models: Models = None


def train(config, workdir: str, *, gold_scorer: Optional[GoldScorer] = None, prompt_source: Optional[Iterator] = None,
          ptx_source: Optional[Iterator] = None) -> PPOResult:
    """Run PPO from `config` in `workdir` (resuming from its newest checkpoint if any).

    `gold_scorer(index [B], tokens [B, N], mask [B, N]) -> [B]` (host numpy) adds `gold/mean`;
    `prompt_source` / `ptx_source` replace the configured data (iterators yielding this
    process's numpy batches, with `get_state()` / `set_state()` for exact resume).
    """
    mesh = setup.setup_run(config, workdir, validate=lambda shape: validate_config(config, shape))
    models = build_models(config)
    validate_models(config, models)
    has_rm = config.reward.init.source != "none"
    settings = settings_from_config(config, loading.reward_norm(config.reward.init.path) if has_rm else None)
    optimizers = make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=config.ema_decay > 0,
                                          penalty=penalty_coef(config) is not None)
    options = setup.compiler_options(config)

    tokenizer = load_tokenizer(config, models) if (config.data.prompts or config.data.ptx) else None
    prompts_it, ptx_it = make_data(config, workdir, tokenizer, group_size(config))
    prompts_it, ptx_it = prompt_source or prompts_it, ptx_source or ptx_it

    # ---- resume or initialise ---------------------------------------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                               max_to_keep=config.checkpoint.max_to_keep)
    target = algorithms.abstract_state(models, optimizers, state_sh, config.kl.coef, config.ema_decay > 0,
                                       penalty_coef(config))
    restored = checkpointer.restore(state_items(target))
    if restored is None:
        state, resume_step = initial_state(config, models, optimizers, state_sh), None
    else:
        state, resume_step = state_from_items(restored.items), restored.step
        prompts_it.set_state(restored.meta["prompt_data"])
        if ptx_it is not None:
            ptx_it.set_state(restored.meta["ptx_data"])
        logging.info("Resuming PPO from %s/%d", checkpointer.directory, resume_step)

    def meta_fn(_state) -> dict:
        info = {"model": loading.model_meta(models.actor), "stage": "ppo", "prompt_data": prompts_it.get_state()}
        if tokenizer is not None:
            info["tokenizer"] = str(pathlib.Path(tokenizer.name_or_path).absolute())
        if ptx_it is not None:
            info["ptx_data"] = ptx_it.get_state()
        return info

    # ---- compile once, ahead of time --------------------------------------------------------------
    t0 = time.perf_counter()
    if config.profile_phases:
        step_fn = timed_phases(models, settings, optimizers, mesh, options)
    else:
        step_fn = jit_iteration(models, settings, optimizers, state_sh, mesh, ptx_it is not None, options)
        step_fn = step_fn.lower(target, abstract_batch(config, mesh)).compile()
        logging.info("PPO iteration compiled in %.1fs; %s", time.perf_counter() - t0, memory_report(step_fn))
    compile_seconds = time.perf_counter() - t0
    start_step = int(jax.device_get(state.step))

    def on_step(step: int, host_batch, outputs, row: dict) -> dict:
        extra = {"kl/blowup": float(kl_blew_up(row["kl"], config.kl.blowup_threshold))}
        if extra["kl/blowup"]:
            logging.warning(kl_blowup_message(step, row["kl"], config.kl.blowup_threshold))
        if gold_scorer is not None:
            extra["gold/mean"] = gold_mean(gold_scorer, host_batch["prompts"]["index"], outputs)
        if step == start_step + 1:
            extra["time/compile"] = compile_seconds
        return extra

    writer = metrics_lib.MetricWriter(workdir, resume_step=resume_step)
    try:
        batches = iteration_batches(prompts_it, ptx_it, group_size(config))
        result = loop.train_loop(config, state=state, step_fn=step_fn, batches=batches,
                                 place=lambda host: place_batch(host, mesh), checkpointer=checkpointer,
                                 writer=writer, meta_fn=meta_fn, items_fn=state_items, on_step=on_step, desc="ppo",
                                 what="PPO iterations")
    finally:
        writer.close()
        checkpointer.close()
    return PPOResult(**vars(result), models=models)
