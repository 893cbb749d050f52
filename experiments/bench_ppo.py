"""PPO iteration time: our trainer vs TRL's PPO trainer on matched settings (issue 8).

Both sides: a Llama-family actor and reward model of the same size, a separate per-token critic
initialised from the reward model, the same batch, prompt length, response length (fixed: no EOS
stop), temperature 1, epochs, minibatches and KL coefficient, fp32 on the CPU.
- ours: `rlhf_jax.trainers.ppo.train` (from-scratch actor on synthetic full-length prompts, the RM
  read from a local HF directory written by `save_pretrained`), `profile_phases=True` so each
  iteration logs time/rollout (sampling + reward + reference/old log-probs + values + KL-shaped
  rewards + GAE, one jitted function) and time/update (epochs x minibatches, one jitted function).
- TRL: `trl.experimental.ppo.PPOTrainer` (trl==0.29.1, the `bench` extra) on HF models exported
  from ours (same shapes), a word-level tokenizer over the same vocabulary, iteration time taken
  between `on_step_end` callbacks (one PPO batch per step).
The first iteration (compilation / warm-up) is left out of both; episodes/s = batch / iteration s.

    python experiments/bench_ppo.py                                  # tiny and small presets
    python experiments/bench_ppo.py --presets tiny --iterations 3    # quick
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
import numpy as np  # noqa: E402

from bench_generation import machine_info  # noqa: E402
from configs import ppo as ppo_configs  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params, save_pretrained  # noqa: E402
from rlhf_jax.trainers import ppo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["tiny", "small"], "Settings (see PRESETS).")
flags.DEFINE_integer("iterations", 4, "PPO iterations per run (the first is left out).")
flags.DEFINE_bool("trl", True, "Also run TRL.")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")

# model: TransformerConfig.llama fields; rollout/ppo: the matched PPO settings.
PRESETS = {
    "tiny": dict(model=dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64),
                 batch=16, prompt_len=8, response_len=8, epochs=2, minibatches=2),
    "small": dict(model=dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_len=128),
                  batch=16, prompt_len=32, response_len=64, epochs=2, minibatches=2),
}
KL_COEF, LR = 0.05, 1e-5


def export_models(preset: dict, directory: str) -> tuple[str, str]:
    """Random-init actor (LM) and reward model (1-label classifier) of the preset's shape, as HF dirs."""
    config = TransformerConfig.llama(**preset["model"])
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
def ours_config(preset: dict, reward_dir: str, iterations: int):
    c = ppo_configs.get_config("tiny")
    c.model.update(**{k: v for k, v in preset["model"].items()})
    c.reward.init.update(source="hf", path=reward_dir)
    c.critic.update(type="token", init={"source": "reward", "path": ""})
    c.rewards.rm_weight = 1.0
    c.rewards.rules.target_token.weight = 0.0
    c.rollout.update(batch_size=preset["batch"], prompt_len=preset["prompt_len"],
                     max_new_tokens=preset["response_len"], temperature=1.0, eos_id=-1)
    c.data.min_prompt_len = preset["prompt_len"]  # full prompts, like TRL's
    c.ppo.update(epochs=preset["epochs"], num_minibatches=preset["minibatches"])
    c.kl.update(coef=KL_COEF, adaptive=False)
    c.actor.optim.learning_rate = c.critic.optim.learning_rate = LR
    c.num_steps = iterations
    c.checkpoint.save_every = 10 ** 6
    c.profile_phases = True
    return c


def run_ours(preset: dict, reward_dir: str, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        ppo.train(ours_config(preset, reward_dir, iterations), workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f][1:]  # first: compile + warm-up
    result = {key: statistics.median(r[f"time/{name}"] for r in rows)
              for key, name in (("iteration", "step"), ("rollout", "rollout"), ("update", "update"))}
    result["episodes_per_s"] = preset["batch"] / result["iteration"]
    return result


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
    return {"iteration": float(np.median(times)), "episodes_per_s": batch / float(np.median(times))}


def main(argv):
    del argv
    info = machine_info()
    print(json.dumps(info), flush=True)
    results = {"machine": info, "presets": {}}
    for name in FLAGS.presets:
        preset = PRESETS[name]
        with tempfile.TemporaryDirectory() as directory:
            actor_dir, reward_dir = export_models(preset, directory)
            row = {"settings": preset, "ours": run_ours(preset, reward_dir, FLAGS.iterations)}
            ours = row["ours"]
            print(f"[{name}] ours: {ours['iteration'] * 1e3:.1f} ms/iteration (rollout {ours['rollout'] * 1e3:.1f} ms, "
                  f"update {ours['update'] * 1e3:.1f} ms), {ours['episodes_per_s']:.1f} episodes/s", flush=True)
            if FLAGS.trl:
                row["trl"] = run_trl(preset, actor_dir, reward_dir, FLAGS.iterations)
                row["ratio"] = ours["episodes_per_s"] / row["trl"]["episodes_per_s"]
                print(f"[{name}] TRL : {row['trl']['iteration'] * 1e3:.1f} ms/iteration, "
                      f"{row['trl']['episodes_per_s']:.1f} episodes/s; ours / TRL = {row['ratio']:.2f}x", flush=True)
        results["presets"][name] = row
    results["load_avg_end"] = os.getloadavg()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
