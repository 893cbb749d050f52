"""The RL iteration with host reward functions (`config.rewards.functions`): two jitted programs
with the reward computed on the host in between.

    responses = generate(state, prompts)                    program 1: sampling (KV cache)
    scores    = host reward(decoded responses, fields)      host: rlhf_jax.host_rewards
    state, metrics, outputs = iteration(state, batch + responses + scores)
                                                            program 2: scoring, log-probs, advantages,
                                                            the epochs x minibatches update

Why two programs and not a `jax.pure_callback` inside one: measured by experiments/bench_host_reward.py
(README, verifiable rewards; one CPU device, GRPO on the arithmetic prompts, the variants interleaved):
the per-iteration times of the two are within the run-to-run noise of a shared CPU (tiny preset 62 vs
97 ms, the device-only iteration 95 ms; small preset 13.08 vs 13.05 s, device-only 13.42 s), and the
host step itself costs 1.3-1.5 ms (decode + exact match + format check of 16 responses). Speed does not
decide it, so the rest does: a callback inside the program needs its operands gathered to one device,
runs where XLA places it (with several processes, on each process's own shard, with no way to hand it
that process's prompt fields in batch order), and turns a Python exception in user code into a runtime
error from inside the compiled program. Two programs keep the reward in plain Python with ordinary
errors, and the second program is the same `algorithms.iteration` as without host rewards (it receives
the responses instead of sampling them, from the same RNG key), so the experience, the log-probs and
an exact resume are unchanged.

Several processes: each process decodes and scores its own rows (the prompts it loaded, whose
indices it holds), and the scores are assembled into one global batch-sharded array exactly like
the prompts (`sharding.shard_batch`). A reward function that raises stops the process that ran it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec

from rlhf_jax import algorithms, evaluation, host_rewards, sharding
from rlhf_jax.algorithms import Models, Optimizers, RLSettings, RLState
from rlhf_jax.data import prompt_fields, rollout_data


def make_host_reward(config, tokenizer, eos_id) -> Optional[host_rewards.HostReward]:
    """The configured host reward (None when config.rewards.functions is empty): the functions, the
    prompt files' texts and fields, and the evaluation's decoder stopping at `eos_id` (the rollout's
    stop token, `settings.sampling.eos_id`)."""
    functions = host_rewards.load_functions(config.rewards.functions)
    if not functions:
        return None
    rows = prompt_fields.read_prompt_rows(config.data.prompts)

    def decode(tokens, mask):
        return evaluation.decode_responses(tokenizer, tokens, mask, eos_id)

    return host_rewards.HostReward(functions, rows, decode)


def local_rows(x: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all rows with one process), in the order
    of the host batch it placed (`sharding.shard_batch` inverted)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(sharding.BATCH_AXES)))


def place(host: dict, mesh) -> dict:
    """The device batch plus the prompts' host `index` (which rows' fields the reward functions get)."""
    return {**rollout_data.place_batch(host, mesh), "index": np.asarray(host["prompts"]["index"])}


def abstract_host_inputs(generate, reward: host_rewards.HostReward, batch_sh) -> dict:
    """Shapes of program 2's extra inputs: the compiled generation's outputs and the host scores."""
    responses = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                 for k, v in generate.out_info.items()}
    rows = responses["tokens"].shape[0]
    scores = {name: jax.ShapeDtypeStruct((rows,), np.float32, sharding=batch_sh) for name in ("score",) + reward.names}
    host = {"sampled": scores, **({"greedy": scores} if "greedy_tokens" in responses else {})}
    return {"responses": responses, "host_scores": host}


def host_reward_step(models: Models, settings: RLSettings, optimizers: Optimizers, state_sh: RLState, mesh,
                     with_ptx: bool, reward: host_rewards.HostReward, options: Optional[dict] = None,
                     compile_for: Optional[tuple] = None) -> Callable:
    """`step(state, batch) -> (state, metrics, outputs)` for the loop, `batch` from `place`. Adds
    `time/generate` (program 1, waited for) and `time/reward` (host: transfer, decode, the functions,
    placing the scores), in seconds, to the metrics; `reward/<name>` come from program 2.
    `compile_for=(abstract state, abstract batch)` (`rollout_data.abstract_batch`) compiles both
    programs ahead of time, else they compile at the first call."""
    batch_sh = sharding.batch_sharding(mesh)
    prompt_sh = {k: batch_sh for k in rollout_data.PROMPT_KEYS}
    generate = jax.jit(lambda s, p: algorithms.generate_responses(models, settings, s, p,
                                                                  algorithms.iteration_keys(s)[0]),
                       in_shardings=(state_sh, prompt_sh), out_shardings=batch_sh, compiler_options=options)
    step = jax.jit(lambda s, b: algorithms.iteration(models, settings, optimizers, s, b, batch_sharding=batch_sh),
                   in_shardings=(state_sh, {"prompts": prompt_sh, "ptx": batch_sh if with_ptx else None,
                                            "responses": batch_sh, "host_scores": batch_sh}),
                   out_shardings=(state_sh, sharding.replicated(mesh), batch_sh), donate_argnums=(0,),
                   compiler_options=options)

    if compile_for is not None:
        target, batch = compile_for
        generate = generate.lower(target, batch["prompts"]).compile()
        step = step.lower(target, {**batch, **abstract_host_inputs(generate, reward, batch_sh)}).compile()

    def score(index, responses, prefix: str) -> dict:
        values = reward(index, local_rows(responses[f"{prefix}tokens"], mesh), local_rows(responses[f"{prefix}mask"],
                                                                                           mesh))
        return sharding.shard_batch(values, mesh)

    def run(state: RLState, batch: dict):
        index = batch["index"]
        t0 = time.perf_counter()
        responses = jax.block_until_ready(generate(state, batch["prompts"]))
        t1 = time.perf_counter()
        host = {"sampled": score(index, responses, "")}
        if "greedy_tokens" in responses:  # ReMax: the greedy baseline is scored by the same functions
            host["greedy"] = score(index, responses, "greedy_")
        t2 = time.perf_counter()
        device_batch = {"prompts": batch["prompts"], "ptx": batch["ptx"], "responses": responses, "host_scores": host}
        state, metrics, outputs = step(state, device_batch)
        return state, {**metrics, "time/generate": t1 - t0, "time/reward": t2 - t1}, outputs

    return run
