"""RL iteration time: ours vs TRL's PPO trainer and Tunix's PPO / GRPO learners, matched settings
(issues 8 and 21).

All sides: a Qwen2-shaped actor (q/k/v bias; Tunix's PPO needs its Qwen2 class, see
`tunix_driver.py`), the same batch (responses per iteration), prompt length, response length
(fixed: no EOS can stop a response), temperature 1, epochs x minibatches, learning rate, fp32 on the
CPU. PPO: a reward model of the actor's shape and a separate per-token critic initialised from it,
KL 0.05 (k1) in the reward, GAE. GRPO (ours and Tunix; TRL is not run): group size 4, no critic,
score = occurrences of token 3 in the response (our rule reward, a host function on Tunix's side),
k3 KL 0.05 as a loss term.
- ours: `rlhf_jax.trainers.ppo.train` (from-scratch actor on synthetic full-length prompts, the RM
  read from a local HF directory written by `save_pretrained`), `profile_phases=True` so each
  iteration logs time/rollout (sampling + reward + reference/old log-probs + values + KL-shaped
  rewards + advantages, one jitted function) and time/update (epochs x minibatches, one jitted function).
- TRL (PPO only): `trl.experimental.ppo.PPOTrainer` (trl==0.29.1, the `bench` extra) on HF models
  exported from ours (same shapes), a word-level tokenizer over the same vocabulary, iteration time
  taken between `on_step_end` callbacks (one PPO batch per step).
- Tunix: `experiments/tunix_driver.py` run by `--tunix_python` (Tunix's own virtual environment,
  `scripts/tunix_venv.sh`), same shapes with random init, iteration = one global step.
Every side runs `--rounds` times, the sides alternating within each round (load hits all of them
alike); per run the first iteration (compilation / warm-up) is left out and the median of the rest
taken; the table gives the median over rounds. episodes/s = batch / iteration s.

    python experiments/bench_ppo.py --tunix_python=.venv-tunix/bin/python     # everything
    python experiments/bench_ppo.py --presets tiny --iterations 3 --rounds 1 --notrl  # quick
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_generation helpers

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_generation import machine_info  # noqa: E402
from configs import ppo as ppo_configs  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params, save_pretrained  # noqa: E402
from rlhf_jax.trainers import ppo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny", "small"], "Settings (see PRESETS).")
flags.DEFINE_list("algorithms", ["ppo", "grpo"], "ppo and/or grpo (TRL runs PPO only).")
flags.DEFINE_integer("iterations", 4, "RL iterations per run (the first is left out).")
flags.DEFINE_integer("rounds", 3, "Runs of every side, alternating; the table gives the median over rounds.")
flags.DEFINE_bool("trl", True, "Also run TRL (PPO).")
flags.DEFINE_string("tunix_python", "", "Python of Tunix's virtual environment (scripts/tunix_venv.sh); "
                    "empty = Tunix is not run.")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")

# model: TransformerConfig.llama fields (+ qkv_bias: Qwen2-shaped); the rest: the matched RL settings.
PRESETS = {
    "tiny": dict(model=dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64),
                 batch=16, prompt_len=8, response_len=8, epochs=2, minibatches=2),
    "small": dict(model=dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_len=128),
                  batch=16, prompt_len=32, response_len=64, epochs=2, minibatches=2),
}
KL_COEF, LR, GROUP_SIZE, TARGET_TOKEN = 0.05, 1e-5, 4, 3


def export_models(preset: dict, directory: str) -> tuple[str, str]:
    """Random-init actor (LM) and reward model (1-label classifier) of the preset's shape, as HF dirs."""
    config = TransformerConfig.llama(qkv_bias=True, **preset["model"])
    paths = []
    for name, heads, seed in (("actor", ("lm",), 0), ("reward", ("value",), 1)):
        model = Transformer(config, heads=heads)
        path = os.path.join(directory, name)
        save_pretrained(model, init_params(model, jax.random.PRNGKey(seed)), path,
                        extra_config={"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None})
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------
def ours_config(algorithm: str, preset: dict, reward_dir: str, iterations: int):
    c = ppo_configs.get_config(f"tiny,{algorithm}")
    c.model.update(qkv_bias=True, **preset["model"])
    if algorithm == "ppo":
        c.reward.init.update(source="hf", path=reward_dir)
        c.critic.update(type="token", init={"source": "reward", "path": ""})
        c.rewards.rm_weight = 1.0
        c.rewards.rules.target_token.weight = 0.0
    else:
        c.algorithm.update(group_size=GROUP_SIZE, kl_estimator="k3")
        c.rewards.rules.target_token.update(weight=1.0, token=TARGET_TOKEN)
    c.rollout.update(batch_size=preset["batch"], prompt_len=preset["prompt_len"],
                     max_new_tokens=preset["response_len"], temperature=1.0, eos_id=-1)
    c.data.min_prompt_len = preset["prompt_len"]  # full prompts, like TRL's and Tunix's
    c.ppo.update(epochs=preset["epochs"], num_minibatches=preset["minibatches"])
    c.kl.update(coef=KL_COEF, adaptive=False)
    c.actor.optim.learning_rate = c.critic.optim.learning_rate = LR
    c.num_steps = iterations
    c.checkpoint.save_every = 10 ** 6
    c.profile_phases = True
    return c


def run_ours(algorithm: str, preset: dict, reward_dir: str, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        ppo.train(ours_config(algorithm, preset, reward_dir, iterations), workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f][1:]  # first: compile + warm-up
    return {key: statistics.median(r[f"time/{name}"] for r in rows)
            for key, name in (("iteration", "step"), ("rollout", "rollout"), ("update", "update"))}


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A PreTrainedTokenizerFast over tokens t0..t{V-1} (t0 = pad, t1 = eos), left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2",
                                   padding_side="left")


def run_trl(preset: dict, actor_dir: str, reward_dir: str, iterations: int) -> dict:
    import datasets
    import torch
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(os.cpu_count())
    batch = preset["batch"]
    ids = np.random.RandomState(0).randint(3, preset["model"]["vocab_size"], (batch * iterations, preset["prompt_len"]))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32)
    policy, ref = (load(transformers.AutoModelForCausalLM, actor_dir) for _ in range(2))
    reward, value = (load(transformers.AutoModelForSequenceClassification, reward_dir) for _ in range(2))
    for model in (policy, ref):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

    stamps = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                         num_mini_batches=preset["minibatches"], num_ppo_epochs=preset["epochs"],
                         total_episodes=batch * iterations, response_length=preset["response_len"],
                         local_rollout_forward_batch_size=batch, stop_token=None, temperature=1.0,
                         kl_coef=KL_COEF, learning_rate=LR, missing_eos_penalty=None, num_sample_generations=0,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=10 ** 6, seed=0,
                         bf16=False, fp16=False, dataloader_num_workers=0)
        trainer = PPOTrainer(args=args, processing_class=word_tokenizer(preset["model"]["vocab_size"]),
                             model=policy, ref_model=ref, reward_model=reward, value_model=value,
                             train_dataset=dataset, callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    times = np.diff([start] + stamps)[1:]  # leave out the first iteration
    return {"iteration": float(np.median(times))}


# ----------------------------------------------------------------------------------------------
# Tunix (its own virtual environment: a subprocess)
# ----------------------------------------------------------------------------------------------
def tunix_settings(algorithm: str, preset: dict, iterations: int) -> dict:
    """The settings object `tunix_driver.py` reads (see its docstring)."""
    return {"algorithm": algorithm, "model": preset["model"], "batch": preset["batch"],
            "prompt_len": preset["prompt_len"], "response_len": preset["response_len"],
            "epochs": preset["epochs"], "minibatches": preset["minibatches"], "group_size": GROUP_SIZE,
            "kl_coef": KL_COEF, "lr": LR, "iterations": iterations}


def run_tunix(python: str, algorithm: str, preset: dict, iterations: int) -> dict:
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunix_driver.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    proc = subprocess.run([python, driver, json.dumps(tunix_settings(algorithm, preset, iterations))],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"tunix_driver.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"iteration": statistics.median(out["iterations"][1:]), "versions": out["versions"]}


# ----------------------------------------------------------------------------------------------
# Alternating rounds, medians, the table
# ----------------------------------------------------------------------------------------------
def sides(algorithm: str) -> list[str]:
    return ["ours"] + (["trl"] if FLAGS.trl and algorithm == "ppo" else []) + (["tunix"] if FLAGS.tunix_python else [])


def run_side(side: str, algorithm: str, preset: dict, actor_dir: str, reward_dir: str) -> dict:
    if side == "ours":
        return run_ours(algorithm, preset, reward_dir, FLAGS.iterations)
    if side == "trl":
        return run_trl(preset, actor_dir, reward_dir, FLAGS.iterations)
    return run_tunix(FLAGS.tunix_python, algorithm, preset, FLAGS.iterations)


def summarize(runs: dict, batch: int) -> dict:
    """Median over rounds of each side's per-run medians, episodes/s and ours / peer ratios."""
    row = {}
    for side, results in runs.items():
        row[side] = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "versions"}
        row[side]["episodes_per_s"] = batch / row[side]["iteration"]
        row[side]["runs"] = [r["iteration"] for r in results]
    for side in runs:
        if side != "ours":
            row[f"ours/{side}"] = row[side]["iteration"] / row["ours"]["iteration"]
    return row


def main(argv):
    del argv
    info = machine_info()
    print(json.dumps(info), flush=True)
    results = {"machine": info, "settings": dict(presets=PRESETS, kl_coef=KL_COEF, lr=LR, group_size=GROUP_SIZE,
                                                  iterations=FLAGS.iterations, rounds=FLAGS.rounds), "rows": {}}
    for name in FLAGS.presets:
        preset = PRESETS[name]
        print(f"[{name}] settings: {json.dumps(preset)}, kl_coef {KL_COEF}, lr {LR}, GRPO group {GROUP_SIZE}, "
              f"{FLAGS.iterations} iterations per run (first left out), {FLAGS.rounds} rounds", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            actor_dir, reward_dir = export_models(preset, directory)
            for algorithm in FLAGS.algorithms:
                runs = {side: [] for side in sides(algorithm)}
                for round_ in range(FLAGS.rounds):
                    for side in runs:
                        result = run_side(side, algorithm, preset, actor_dir, reward_dir)
                        results.setdefault("versions", {}).update(result.pop("versions", {}))
                        runs[side].append(result)
                        print(f"[{name} {algorithm} round {round_ + 1}] {side}: {result['iteration'] * 1e3:.1f} "
                              f"ms/iteration, load {os.getloadavg()[0]:.1f}", flush=True)
                row = summarize(runs, preset["batch"])
                results["rows"][f"{name}/{algorithm}"] = row
                ours = row["ours"]
                line = (f"[{name} {algorithm}] ours {ours['iteration'] * 1e3:.1f} ms (rollout "
                        f"{ours['rollout'] * 1e3:.1f}, update {ours['update'] * 1e3:.1f})")
                for side in runs:
                    if side != "ours":
                        line += f"; {side} {row[side]['iteration'] * 1e3:.1f} ms, ours/{side} {row[f'ours/{side}']:.2f}x"
                print(line, flush=True)
    results["load_avg_end"] = os.getloadavg()
    print(json.dumps(results["versions"]) if "versions" in results else "", flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
