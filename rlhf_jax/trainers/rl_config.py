"""The RL stage's config, read once: checks that name the key (before anything is built or
compiled), the algorithm from the catalog, and the static `RLSettings` of the iteration.

The config (configs/ppo.py) has one section per model role, each with an `init` like SFT/RM's:
`actor`, `reference` (default: the actor's start), `critic` (type token | shared | sequence;
trunk from the actor, the reward model or its own init), `reward` (none | checkpoint | hf), and
`algorithm` (name from `rlhf_jax.algorithms.ALGORITHMS` and its hyperparameters).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax

from rlhf_jax import algorithms, generation, host_rewards, loading, lora
from rlhf_jax import rewards as rewards_lib
from rlhf_jax.algorithms import Models, RLSettings
from rlhf_jax.data import chat
from rlhf_jax.trainers import setup

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
    if config.algorithm.kl_in not in ("", "reward", "loss", "none"):
        fail(f"config.algorithm.kl_in={config.algorithm.kl_in!r} (allowed: '' = the algorithm's, 'reward', 'loss', "
             "'none')")
    if config.algorithm.dual_clip and config.algorithm.dual_clip <= 1:
        fail(f"config.algorithm.dual_clip={config.algorithm.dual_clip}: need > 1 (or 0 = off)")
    if config.critic.type not in CRITIC_TYPES:
        fail(f"config.critic.type={config.critic.type!r} (allowed: {', '.join(map(repr, CRITIC_TYPES))})")
    if config.actor.lora.rank and config.reference.init.source != "actor":
        fail(f"config.actor.lora.rank={config.actor.lora.rank} needs config.reference.init.source='actor' (the "
             f"reference is the adapter-free actor), got {config.reference.init.source!r}")
    lora.LoraSpec.from_config(config.actor.lora, "config.actor.lora")  # also: quantize without a rank
    if algorithm.critic != "none":
        lora.LoraSpec.from_config(config.critic.lora, "config.critic.lora")
    if config.critic.lora.rank and algorithm.critic != "none":
        if config.critic.type == "shared":
            fail(f"config.critic.lora.rank={config.critic.lora.rank} with config.critic.type='shared': the shared "
                 "value head sits on the actor's trunk, whose adapters are config.actor.lora's (set critic.lora.rank=0)")
        if config.critic.init.source not in ("reward", "actor"):
            fail(f"config.critic.lora.rank={config.critic.lora.rank} needs config.critic.init.source 'reward' or "
                 f"'actor' (the frozen base is that role's weights, read in place), got "
                 f"{config.critic.init.source!r}")
        if config.critic.init.source == "actor" and config.reference.init.source != "actor":
            fail(f"config.critic.lora.rank={config.critic.lora.rank} with config.critic.init.source='actor' needs "
                 "config.reference.init.source='actor' (the critic's frozen base is the reference's copy of the "
                 f"actor's starting weights), got {config.reference.init.source!r}")
        actor_base, critic_base = quantised_base(config.actor.lora), quantised_base(config.critic.lora)
        if config.critic.init.source == "actor" and critic_base != actor_base:
            fields = ("quantize", "quantize_block", "target_modules") if actor_base and critic_base else ("quantize",)
            differ = [f for f in fields if config.critic.lora[f] != config.actor.lora[f]]
            fail(f"config.critic.lora.{differ[0]}={config.critic.lora[differ[0]]!r} with config.critic.init.source="
                 "'actor': the critic reads the actor's frozen base in place, stored as config.actor.lora stores it; "
                 "set " + ", ".join(f"critic.lora.{f}={config.actor.lora[f]!r}" for f in differ) + " (the actor's)")
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
    functions = host_rewards.load_functions(config.rewards.functions)  # imports them: errors before compiling
    if not config.rewards.rm_weight and not rewards_lib.active_rules(config.rewards.rules) and not functions:
        fail("config.rewards: no reward at all (rm_weight=0, every rule weight is 0 and no reward functions)")
    if functions and not config.data.prompts:
        fail(f"config.rewards.functions={config.rewards.functions!r} needs config.data.prompts (the functions see "
             "the prompt texts and the prompt file's fields)")
    if functions and config.profile_phases:
        fail("config.profile_phases with config.rewards.functions: the host-reward iteration is already two "
             "programs and logs time/generate and time/reward; set profile_phases=False")
    if not config.data.prompts and config.actor.init.source != "scratch":
        fail("config.data.prompts is empty: synthetic prompts are only for a from-scratch actor "
             "(config.actor.init.source='scratch')")
    if config.rollout.temperature <= 0:
        fail(f"config.rollout.temperature={config.rollout.temperature}: PPO samples from the policy, need > 0")
    stop = rollout_stop_ids(config)
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
        check_special_ids(config, stop, config.model.vocab_size, "the vocabulary")
        if config.data.min_prompt_len < 1 or config.data.min_prompt_len > config.rollout.prompt_len:
            fail(f"config.data.min_prompt_len={config.data.min_prompt_len}: need 1..rollout.prompt_len")


def quantised_base(lora_config) -> tuple:
    """How a LoRA section stores the frozen base it reads: () for fp32 (no LoRA, or quantize 'none'),
    else (quantize, quantize_block, target_modules): two roles can read one base only if these agree."""
    if not lora_config.rank or lora_config.quantize == "none":
        return ()
    return lora_config.quantize, lora_config.quantize_block, lora_config.target_modules


def validate_models(config, models: Models) -> None:
    """Checks that need the architectures (known once the earlier stages' metadata is read)."""
    cfg = models.actor.config
    if cfg.positions == "learned":
        setup.validate_sequence_length(config.rollout.prompt_len, config.rollout.max_new_tokens, cfg.max_len,
                                       "config.rollout", "the actor's learned position table")
    check_special_ids(config, rollout_stop_ids(config), cfg.vocab_size, "the actor's vocabulary")
    for role in ("ref", "critic", "reward"):
        other = getattr(models, role)
        if other is not None and other.config.vocab_size != cfg.vocab_size:
            key = {"ref": "reference"}.get(role, role)
            raise ValueError(f"config.{key}.init: its vocabulary ({other.config.vocab_size}) differs from the "
                             f"actor's ({cfg.vocab_size}); every role must share the tokenizer")


def rollout_stop_ids(config) -> tuple[int, ...]:
    """config.rollout.eos_id (an id, a list of ids, or -1 = none) as a `generation.stop_ids` tuple."""
    try:
        return generation.stop_ids(config.rollout.eos_id)
    except ValueError as error:
        raise ValueError(f"config.rollout.{error}") from None


def check_special_ids(config, stop: tuple[int, ...], vocab_size: int, vocabulary: str) -> None:
    """The stop and pad ids must be token ids of the model (ValueError naming the key)."""
    for key, ids in (("eos_id", stop), ("pad_id", (config.rollout.pad_id,))):
        if any(i >= vocab_size for i in ids):
            raise ValueError(f"config.rollout.{key}={config.rollout[key]} is outside {vocabulary} ({vocab_size})")


def check_special_tokens(rollout, tokenizer, key: str) -> None:
    """The rollout's stop set and pad id must be the tokenizer's (`chat.stop_ids` / `chat.pad_id`):
    ValueError naming `key`.eos_id / .pad_id and the values to set otherwise."""
    stop = chat.stop_ids(tokenizer)
    if generation.stop_ids(rollout.eos_id) != stop:
        value = stop[0] if len(stop) == 1 else list(stop)
        raise ValueError(f"{key}.eos_id={rollout.eos_id} but the tokenizer's stop ids are {list(stop)} "
                         f"(set --{key}.eos_id={value})")
    if rollout.pad_id != chat.pad_id(tokenizer):
        raise ValueError(f"{key}.pad_id={rollout.pad_id} but the tokenizer's is {chat.pad_id(tokenizer)}")


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
    the critic type (algorithms with a critic), hyperparameters; rules validated, eos_id -> the stop set."""
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
            top_p=float(rollout.top_p), eos_id=rollout_stop_ids(config),
            pad_id=rollout.pad_id),
        advantage=advantage, critic=critic, policy_loss=algorithm.policy_loss, kl_in=alg_cfg.kl_in or algorithm.kl_in,
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


def reference_init(config):
    """The reference's init section: the actor's unless config.reference.init names its own."""
    return config.actor.init if config.reference.init.source == "actor" else config.reference.init


def penalty_coef(config) -> Optional[float]:
    """PPO-penalty's initial β_pen (None for the other policy losses: no such state)."""
    return config.algorithm.penalty_coef if algorithm_of(config).policy_loss == "penalty" else None
