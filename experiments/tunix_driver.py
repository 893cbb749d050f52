"""Tunix's side of `bench_ppo.py`: PPO or GRPO iterations with google-tunix, timed per iteration.

Runs in Tunix's own virtual environment (it pins its own jax/flax; see `scripts/tunix_venv.sh`),
so it imports nothing from rlhf_jax. `bench_ppo.py` starts it as a subprocess:

    .venv-tunix/bin/python experiments/tunix_driver.py '{"algorithm": "ppo", "model": {...}, ...}'

and reads the last stdout line, one JSON object: {"iterations": [seconds, ...], "versions": {...}}.
The settings object has `algorithm` ("ppo" | "grpo"), `model` (the `TransformerConfig.llama` fields
of the preset: vocab_size, d_model, n_layers, n_heads, d_ff), `batch` (responses per iteration),
`prompt_len`, `response_len`, `epochs`, `minibatches`, `group_size` (GRPO), `kl_coef`, `lr`,
`iterations`.

Models: Tunix's Qwen2 class for every role (its PPO passes `segment_ids` to the reward and critic
models, which its Llama-3 class does not accept), so q/k/v carry biases; untied LM head, random
init, fp32. The reward model and the critic are Qwen2 trunks whose LM head is replaced by a
`[d_model, 1]` projection (Tunix reads per-token scores `[B, T, 1]` from them).
PPO: separate critic and reward model, KL to the reference in the reward (k1, `kl_method="kl"`),
GAE (gamma 1, lambda 0.95). GRPO: no critic, the score is a host function of the completion text
(the number of times token `t3` occurs, as our rule reward `target_token`), KL as a k3 loss term
(`kl_loss_mode="low_var_kl"`). Prompts are full-length strings of word tokens `t3 .. t{V-1}`; no
EOS can be sampled (the stop id is outside the vocabulary), so every response has `response_len`
tokens.

Minibatches: in Tunix a global step (one iteration here) walks the full batch in
`mini_batch_size` pieces, and each piece is generated, scored and then trained on for
`num_iterations` (= epochs) passes. So `epochs x minibatches` optimizer steps of `batch /
minibatches` responses each, as ours, but generation runs `minibatches` times on the smaller batch.
Iteration time: between consecutive calls of the learner's `_run_global_step` (the loop makes one
more call that finds the data exhausted; without it the last iteration ends when the actor's
parameters are ready).
"""
from __future__ import annotations

import importlib.metadata
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen2 import model as qwen2
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout

TARGET_TOKEN = "t3"  # GRPO's score: occurrences of this word token in the completion


class WordTokenizer:
    """Word tokens t0..t{V-1} (t0 = pad, t1 = eos), one id per whitespace-separated word: the
    methods Tunix's `TokenizerAdapter` asks of a tokenizer that is neither SentencePiece nor HF."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return 1

    def pad_id(self) -> int:
        return 0


def qwen2_config(model: dict) -> qwen2.ModelConfig:
    return qwen2.ModelConfig(num_layers=model["n_layers"], vocab_size=model["vocab_size"], embed_dim=model["d_model"],
                             hidden_dim=model["d_ff"], num_heads=model["n_heads"],
                             head_dim=model["d_model"] // model["n_heads"], num_kv_heads=model["n_heads"],
                             rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=False)


def scalar_model(config: qwen2.ModelConfig, seed: int) -> qwen2.Qwen2:
    """A Qwen2 trunk with a `[d_model, 1]` head: per-token scores `[B, T, 1]` (reward model, critic)."""
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(seed))
    model.lm_head = qwen2.Einsum(einsum_str="BTD,DV->BTV", shape=(config.embed_dim, 1), rngs=nnx.Rngs(seed + 100),
                                 sharding=config.shd_config.emb_dv, dtype=config.dtype,
                                 param_dtype=config.param_dtype)
    return model


def count_target(prompts, completions, **kwargs) -> list[float]:
    del prompts, kwargs
    return [float(text.split().count(TARGET_TOKEN)) for text in completions]


def timed(learner_cls):
    """`learner_cls` whose instances record `time.perf_counter()` at the start of every global step."""

    class Timed(learner_cls):
        stamps: list

        def _run_global_step(self, *args, **kwargs):
            self.stamps.append(time.perf_counter())
            return super()._run_global_step(*args, **kwargs)

    return Timed


def run(settings: dict) -> dict:
    algorithm, batch, iterations = settings["algorithm"], settings["batch"], settings["iterations"]
    vocab = settings["model"]["vocab_size"]
    config = qwen2_config(settings["model"])
    grouped = algorithm == "grpo"
    group = settings["group_size"] if grouped else 1
    prompts_per_iteration = batch // group
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # one CPU device

    actor = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    reference = qwen2.Qwen2(config, rngs=nnx.Rngs(0))  # the actor's starting weights
    critic = reward = None
    if not grouped:
        critic, reward = scalar_model(config, 1), scalar_model(config, 1)  # critic initialised from the RM

    rng = np.random.RandomState(0)
    prompt_ids = rng.randint(3, vocab, (prompts_per_iteration * iterations, settings["prompt_len"]))
    prompts = [" ".join(f"t{i}" for i in row) for row in prompt_ids]
    dataset = [{"prompts": prompts[i:i + prompts_per_iteration]}
               for i in range(0, len(prompts), prompts_per_iteration)]

    mini_batch = prompts_per_iteration // settings["minibatches"]
    with tempfile.TemporaryDirectory() as logdir:
        from tunix.sft import metrics_logger
        training = rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(settings["lr"], weight_decay=0.0),
            critic_optimizer=None if grouped else optax.adamw(settings["lr"], weight_decay=0.0),
            eval_every_n_steps=10 ** 9, max_steps=10 ** 9, mini_batch_size=mini_batch,
            train_micro_batch_size=mini_batch,
            metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=logdir, flush_every_n_steps=10 ** 6),
            pbar_description=None)
        rollout = base_rollout.RolloutConfig(
            max_tokens_to_generate=settings["response_len"], max_prompt_length=settings["prompt_len"],
            kv_cache_size=settings["prompt_len"] + settings["response_len"] + 8, temperature=1.0, top_p=1.0,
            top_k=None, eos_tokens=[vocab + 1])  # a stop id outside the vocabulary: never sampled
        roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.CRITIC, rl_cluster_lib.Role.REFERENCE,
                 rl_cluster_lib.Role.REWARD, rl_cluster_lib.Role.ROLLOUT)
        cluster = rl_cluster_lib.RLCluster(
            actor=actor, critic=critic, reference=reference, reward=reward, tokenizer=WordTokenizer(vocab),
            cluster_config=rl_cluster_lib.ClusterConfig(role_to_mesh={r: mesh for r in roles},
                                                        rollout_engine="vanilla", offload_to_cpu=False,
                                                        training_config=training, rollout_config=rollout))
        if grouped:
            algo = grpo_learner.GRPOConfig(num_generations=group, num_iterations=settings["epochs"],
                                           beta=settings["kl_coef"], kl_loss_mode="low_var_kl", epsilon=0.2)
            learner = timed(grpo_learner.GRPOLearner)(rl_cluster=cluster, algo_config=algo,
                                                      reward_fns=count_target)
        else:
            algo = ppo_learner.PPOConfig(num_iterations=settings["epochs"], beta=settings["kl_coef"],
                                         kl_method="kl", gamma=1.0, gae_lambda=0.95, epsilon=0.2,
                                         clip_range_value=0.2, entropy_coef=0.0)
            learner = timed(ppo_learner.PPOLearner)(rl_cluster=cluster, ppo_config=algo)
        learner.stamps = []
        learner.train(dataset)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        learner.stamps.append(time.perf_counter())
    # A call past the data ends the loop (StopIteration): iteration i ends where call i + 1 starts.
    return {"iterations": np.diff(learner.stamps).tolist()[:iterations],
            "versions": {name: importlib.metadata.version(name)
                         for name in ("google-tunix", "jax", "jaxlib", "flax", "optax")}}


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    print(json.dumps(result), flush=True)
