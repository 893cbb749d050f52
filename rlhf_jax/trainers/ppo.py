"""The RL trainer (InstructGPT stage 3: PPO / PPO-ptx, and every algorithm of
`rlhf_jax.algorithms.ALGORITHMS` by `config.algorithm.name`): config -> models, state, data -> the loop.

    from rlhf_jax.trainers import ppo
    result = ppo.train(config, workdir)          # configs/ppo.py; resumes from WORKDIR/checkpoints

The iteration itself (rollout -> update, one jitted program on device) is `rlhf_jax.algorithms`;
the config checks and settings are `rl_config.py`; the four roles' models, starting weights and
checkpoint items are `rl_models.py`; this module is the host side: the tokenizer, gold scoring and
the KL blow-up check as loop hooks, the compiled iteration, the run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Callable, Iterator, Mapping, Optional

import jax
import numpy as np
from absl import logging

from rlhf_jax import algorithms, loading, sharding
from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.algorithms import Models, Optimizers, RLSettings, RLState
from rlhf_jax.data import rollout_data
from rlhf_jax.data.rollout_data import abstract_batch, iteration_batches, make_data, place_batch
from rlhf_jax.trainers import host_step, lora_state, loop, rl_config, setup
from rlhf_jax.trainers.rl_config import (  # noqa: F401 (validate_config, settings_from_config: also ppo.*)
    group_size, penalty_coef, settings_from_config, validate_config, validate_models)
from rlhf_jax.trainers.rl_models import (  # noqa: F401 (build_models, initial_state, ...: also ppo.*)
    build_models, compiles_ahead, frozen_params, initial_state, make_optimizers, reread_roles, state_from_items,
    state_items)

# ----------------------------------------------------------------------------------------------
# Tokenizer (the data itself: rlhf_jax.data.rollout_data)
# ----------------------------------------------------------------------------------------------
def load_tokenizer(config, models: Models):
    """The run's tokenizer (config.data.tokenizer, else the one recorded with the actor's checkpoint,
    else its HF dir), checked against the model's vocabulary and the configured EOS / pad ids."""
    tokenizer = loading.load_tokenizer(loading.tokenizer_path(config.data.tokenizer, config.actor.init,
                                                              key="config.actor.init"))
    loading.check_vocab(models.actor, tokenizer, config.actor.init, "config.actor.init", config.data.tokenizer)
    rl_config.check_special_tokens(config.rollout, tokenizer, "config.rollout")
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


def sample_records(tokenizer, prompts: Mapping[str, np.ndarray], outputs: Mapping[str, jax.Array],
                   count: int) -> list[dict]:
    """The first `count` rollout responses of an iteration as {"prompt", "response"} texts (prompts
    left-padded `prompt_ids` / `prompt_mask` [B, P], responses `tokens` / `mask` [B, N])."""
    tokens, mask = np.asarray(outputs["tokens"]), np.asarray(outputs["mask"])
    ids, prompt_mask = np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_mask"])
    return [{"prompt": tokenizer.decode(ids[i][prompt_mask[i] > 0]), "response": tokenizer.decode(tokens[i][mask[i] > 0])}
            for i in range(min(count, tokens.shape[0]))]


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
    mesh = setup.setup_run(config, workdir, validate=lambda shape: validate_config(config, shape), stage="ppo")
    models = build_models(config)
    validate_models(config, models)
    if models.actor_lora is not None and config.actor.init.source == "scratch" and jax.process_index() == 0:
        print(f"WARNING config.actor.lora.rank={config.actor.lora.rank} on a freshly initialised actor "
              "(config.actor.init.source='scratch'): that base is never saved, so this run's adapters cannot be "
              "loaded, merged or exported later (rlhf_jax.load refuses them); start from an SFT checkpoint or HF "
              "model for a run you keep", file=sys.stderr, flush=True)
    has_rm = config.reward.init.source != "none"
    settings = settings_from_config(config, loading.reward_norm(config.reward.init.path) if has_rm else None)
    optimizers = make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=config.ema_decay > 0,
                                          penalty=penalty_coef(config) is not None)
    options = setup.compiler_options(config)

    tokenizer = load_tokenizer(config, models) if (config.data.prompts or config.data.ptx) else None
    host_reward = host_step.make_host_reward(config, tokenizer, settings.sampling.eos_id)  # None without functions
    prompts_it, ptx_it = make_data(config, workdir, tokenizer, group_size(config),
                                   report=functools.partial(setup.report_data, workdir))
    prompts_it, ptx_it = prompt_source or prompts_it, ptx_source or ptx_it

    # ---- resume or initialise ---------------------------------------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                               max_to_keep=config.checkpoint.max_to_keep)
    target = algorithms.abstract_state(models, optimizers, state_sh, config.kl.coef, config.ema_decay > 0,
                                       penalty_coef(config))
    reread = reread_roles(models)
    items_fn = functools.partial(state_items, with_ref="ref" not in reread, with_reward="reward" not in reread)
    restored = checkpointer.restore(items_fn(target))
    if restored is None:
        state, resume_step = initial_state(config, models, optimizers, state_sh), None
    else:
        state, resume_step = state_from_items(restored.items), restored.step
        for role in reread:  # frozen bases not in the checkpoint: read again where they started
            state = state.replace(**{role: frozen_params(config, models, role, state_sh, options)})
        prompts_it.set_state(restored.meta["prompt_data"])
        if ptx_it is not None:
            ptx_it.set_state(restored.meta["ptx_data"])
        logging.info("Resuming PPO from %s/%d", checkpointer.directory, resume_step)

    def meta_fn(_state) -> dict:
        info = {"model": loading.model_meta(models.actor), "stage": "ppo", "prompt_data": prompts_it.get_state()}
        if models.actor_lora is not None:  # "params" holds the adapters: loading merges them into the base
            path = config.actor.init.path
            info["lora"] = {**models.actor_lora.meta(), "base": {
                "source": config.actor.init.source, "path": str(pathlib.Path(path).absolute()) if path else ""}}
        if tokenizer is not None:
            info["tokenizer"] = str(pathlib.Path(tokenizer.name_or_path).absolute())
        if ptx_it is not None:
            info["ptx_data"] = ptx_it.get_state()
        return info

    if models.actor_lora is not None or models.critic_lora is not None:  # the LoRA stages' start-up line
        roles = ["actor", "reference (the actor's base)"] + ["critic"] * (state.critic is not None) + \
            ["reward model"] * (state.reward is not None)
        lora_state.memory_line({"actor": state.actor, "critic": state.critic}, {"ref": state.ref, "reward": state.reward},
                               {"actor": state.actor_opt, "critic": state.critic_opt}, " + ".join(roles))

    # ---- compile once, ahead of time (else at the first call: profile_phases, nf4 bases) -------------
    t0 = time.perf_counter()
    place = functools.partial(place_batch, mesh=mesh)
    ahead = compiles_ahead(models) and not config.profile_phases
    if host_reward is not None:  # two programs with the host reward between them
        step_fn = host_step.host_reward_step(models, settings, optimizers, state_sh, mesh, ptx_it is not None,
                                             host_reward, options, (target, abstract_batch(config, mesh)) if ahead
                                             else None)
        place = functools.partial(host_step.place, mesh=mesh)
    elif config.profile_phases:
        step_fn = timed_phases(models, settings, optimizers, mesh, options)
    else:
        step_fn = jit_iteration(models, settings, optimizers, state_sh, mesh, ptx_it is not None, options)
        if ahead:
            step_fn = step_fn.lower(target, abstract_batch(config, mesh)).compile()
            logging.info("PPO iteration compiled in %.1fs; %s", time.perf_counter() - t0, memory_report(step_fn))
    compile_seconds = time.perf_counter() - t0 if ahead else None  # else part of the first iteration's time
    start_step = int(jax.device_get(state.step))

    def on_step(step: int, host_batch, outputs, row: dict) -> dict:
        extra = {"kl/blowup": float(kl_blew_up(row["kl"], config.kl.blowup_threshold))}
        if extra["kl/blowup"]:
            logging.warning(kl_blowup_message(step, row["kl"], config.kl.blowup_threshold))
        if gold_scorer is not None:
            extra["gold/mean"] = gold_mean(gold_scorer, host_batch["prompts"]["index"], outputs)
        if step == start_step + 1 and compile_seconds is not None:
            extra["time/compile"] = compile_seconds
        if config.log_samples and tokenizer is not None and outputs is not None and jax.process_count() == 1:
            writer.write_text(step, "samples", metrics_lib.samples_markdown(
                sample_records(tokenizer, host_batch["prompts"], outputs, config.log_samples)))
        return extra

    if tokenizer is not None:  # WORKDIR/tokenizer, as SFT and RM runs keep theirs (export_hf, rlhf_jax.load_run)
        loading.save_tokenizer(tokenizer, workdir)
    writer = metrics_lib.MetricWriter(workdir, resume_step=resume_step)
    try:
        batches = iteration_batches(prompts_it, ptx_it, group_size(config))
        result = loop.train_loop(config, state=state, step_fn=step_fn, batches=batches,
                                 place=place, checkpointer=checkpointer,
                                 writer=writer, meta_fn=meta_fn, items_fn=items_fn, on_step=on_step,
                                 desc=config.algorithm.name,
                                 what="PPO iterations")
    finally:
        writer.close()
        checkpointer.close()
    return PPOResult(**vars(result), models=models)
