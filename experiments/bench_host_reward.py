"""Host reward functions inside the RL iteration: a callback in one program vs two programs (issue 18).

On the arithmetic task's prompts (GSM8K format), GRPO with the exact-match and format reward
functions (`rlhf_jax.tasks.answers`), three ways per preset:
- `two_programs`: what the trainer does (`trainers/host_step.py`): program 1 generates, the host
  decodes and scores, program 2 is the usual iteration with the responses and scores passed in.
- `callback`: one jitted program: generation, then `jax.pure_callback` into the same host reward
  (decode + functions), then the rest of the iteration.
- `device_only`: one jitted program with an on-device rule reward instead (the cost floor: what the
  iteration costs without any host step).
Per iteration (the first, which compiles, left out): median wall seconds, the variants interleaved
iteration by iteration on the same batches; for two_programs also the host reward step alone
(`time/reward`: transfer, decode, the functions, placing the scores).

    python experiments/bench_host_reward.py                          # tiny and small presets
    python experiments/bench_host_reward.py --presets tiny --iterations 4
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_generation helpers

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_generation import machine_info  # noqa: E402
from configs import ppo as ppo_configs  # noqa: E402
from rlhf_jax import algorithms, sharding  # noqa: E402
from rlhf_jax.tasks import arithmetic  # noqa: E402
from rlhf_jax.trainers import host_step, ppo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny", "small"], "Settings (see PRESETS).")
flags.DEFINE_integer("iterations", 6, "Iterations per variant (the first is left out).")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")

# The model shapes of bench_ppo.py's presets; GRPO groups of 4.
PRESETS = {
    "tiny": dict(model=dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64),
                 batch=16, prompt_len=32, response_len=8),
    "small": dict(model=dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_len=128),
                  batch=16, prompt_len=32, response_len=64),
}
FUNCTIONS = "rlhf_jax.tasks.answers:exact_match,rlhf_jax.tasks.answers:answer_format=0.1"


def make_config(preset: dict, files: dict, cache_dir: str):
    config = ppo_configs.get_config("tiny,grpo")
    config.model.update(family="llama", **preset["model"])
    config.rollout.update(batch_size=preset["batch"], prompt_len=preset["prompt_len"],
                          max_new_tokens=preset["response_len"])
    config.rewards.rules.target_token.weight = 0.0
    config.rewards.functions = FUNCTIONS
    config.data.update(prompts=files["ppo_prompts"], tokenizer=files["tokenizer"], cache_dir=cache_dir)
    config.num_steps = 1000
    return config


def setup_run(config, mesh, workdir: str):
    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False)
    tokenizer = ppo.load_tokenizer(config, models)
    prompts, _ = ppo.make_data(config, workdir, tokenizer, ppo.group_size(config))
    batches = ppo.iteration_batches(prompts, None, ppo.group_size(config))
    return models, optimizers, state_sh, tokenizer, batches


def callback_step(models, settings, optimizers, state_sh, mesh, reward):
    """One program with the host reward as a `jax.pure_callback` between generation and scoring."""
    batch_sh = sharding.batch_sharding(mesh)
    names = ("score",) + reward.names

    def host(index, tokens, mask):
        out = reward(np.asarray(index), np.asarray(tokens), np.asarray(mask))
        return np.stack([out[name] for name in names]).astype(np.float32)

    def iteration(state, prompts, index):
        rollout_rng, update_rng = algorithms.iteration_keys(state)
        responses = algorithms.generate_responses(models, settings, state, prompts, rollout_rng)
        values = jax.pure_callback(host, jax.ShapeDtypeStruct((len(names), index.shape[0]), jnp.float32), index,
                                   responses["tokens"], responses["mask"])
        scores = {"sampled": dict(zip(names, values))}
        experience, metrics = algorithms.rollout(models, settings, state, prompts, rollout_rng, responses, scores)
        state, update_metrics = algorithms.update(models, settings, optimizers, state, experience, None, update_rng,
                                                  batch_sh)
        return state, {**metrics, **update_metrics}

    step = jax.jit(iteration, in_shardings=(state_sh, batch_sh, batch_sh), donate_argnums=(0,))
    return lambda state, batch: step(state, batch["prompts"], jnp.asarray(batch["index"], jnp.int32))


def device_only_step(config, models, optimizers, state_sh, mesh):
    device_config = config.copy_and_resolve_references()
    device_config.rewards.functions = ""
    device_config.rewards.rules.target_token.weight = 1.0
    settings = ppo.settings_from_config(device_config)
    step = ppo.jit_iteration(models, settings, optimizers, state_sh, mesh, with_ptx=False)
    return lambda state, batch: step(state, {"prompts": batch["prompts"], "ptx": None})[:2]


def time_variants(steps: dict, config, models, optimizers, state_sh, batches, mesh, iterations: int) -> list[dict]:
    """Median wall seconds per iteration of each variant, the variants interleaved (one iteration of
    each in turn, the same batch) so that load from other processes on the machine hits them alike."""
    states = {name: ppo.initial_state(config, models, optimizers, state_sh) for name in steps}
    times = {name: [] for name in steps}
    reward_times = []
    for _ in range(iterations):
        batch = host_step.place(next(batches), mesh)
        for name, step in steps.items():
            t0 = time.perf_counter()
            states[name], metrics, *_ = step(states[name], batch)
            jax.block_until_ready(states[name].step)
            times[name].append(time.perf_counter() - t0)
            if "time/reward" in metrics:
                reward_times.append(float(metrics["time/reward"]))
    rows = []
    for name in steps:
        row = {"variant": name, "iteration_s": statistics.median(times[name][1:])}
        if name == "two_programs":
            row["reward_s"] = statistics.median(reward_times[1:])
            row["reward_fraction"] = row["reward_s"] / row["iteration_s"]
        logging.info("%s", row)
        rows.append(row)
    return rows


def bench_preset(name: str, preset: dict, iterations: int, directory: str) -> list[dict]:
    files = arithmetic.export_arithmetic(os.path.join(directory, name), n_sft=4, n_sft_eval=2, n_rl=512,
                                         n_heldout=4, n_corpus=4)
    config = make_config(preset, files, os.path.join(directory, "tfds"))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    models, optimizers, state_sh, tokenizer, batches = setup_run(config, mesh, directory)
    settings = ppo.settings_from_config(config)
    reward = host_step.make_host_reward(config, tokenizer, settings.sampling.eos_id)
    variants = {"two_programs": host_step.host_reward_step(models, settings, optimizers, state_sh, mesh, False,
                                                           reward),
                "callback": callback_step(models, settings, optimizers, state_sh, mesh, reward),
                "device_only": device_only_step(config, models, optimizers, state_sh, mesh)}
    rows = time_variants(variants, config, models, optimizers, state_sh, batches, mesh, iterations)
    return [{"preset": name, **row} for row in rows]


def main(argv):
    del argv
    results = {"machine": machine_info(), "rows": []}
    with tempfile.TemporaryDirectory() as directory:
        for name in FLAGS.presets:
            results["rows"] += bench_preset(name, PRESETS[name], FLAGS.iterations, directory)
    print("| preset | variant | iteration (ms) | host reward (ms) | host reward share |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        share = f"{100 * r['reward_fraction']:.1f}%" if "reward_s" in r else "–"
        reward_ms = f"{1000 * r['reward_s']:.1f}" if "reward_s" in r else "–"
        print(f"| {r['preset']} | {r['variant']} | {1000 * r['iteration_s']:.1f} | {reward_ms} | {share} |")
    print(json.dumps(results["machine"]))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
