"""Model FLOPs utilisation (MFU) of the SFT, reward-model and PPO-update train steps.

MFU = model FLOPs per step / step time / peak, with the peak measured in this process by a large
`jnp.dot` in the same dtype (issue 8). Model FLOPs are counted analytically (Kaplan et al. 2020 /
PaLM appendix B): 6 per weight per token (forward 2, backward 4) for every weight matrix used as a
matmul (the LM head included, embedding lookups excluded) plus attention 12·L·B·T²·(heads·head_dim)
(QKᵀ and PV, forward and backward); recomputation (remat) is not counted. XLA's own count from the
compiled step's cost analysis is printed next to it.

The steps are the trainers' (`rlhf_jax.trainers.train_state.make_train_step`: gradients, global-norm
clipping, AdamW, non-finite guard) with the library's losses, jitted with the state donated.
PPO update = one minibatch step of the actor (clipped surrogate on the response tokens) and a
separate critic (clipped value loss), the inner step of the PPO epochs x minibatches loop.

    python experiments/bench_mfu.py                      # d_model 512, fp32
    python experiments/bench_mfu.py --d_model 256 --n_layers 2 --seq_len 128 --steps 2   # quick
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_generation helpers

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench_generation import machine_info, matmul_peak_flops  # noqa: E402
from rlhf_jax import losses  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params, last_token_values  # noqa: E402
from rlhf_jax import optim  # noqa: E402
from rlhf_jax.trainers import state as train_state  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 512, "Model width.")
flags.DEFINE_integer("n_layers", 4, "Decoder blocks.")
flags.DEFINE_integer("n_heads", 8, "Attention heads.")
flags.DEFINE_integer("d_ff", 1536, "SwiGLU hidden width.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
flags.DEFINE_integer("batch", 4, "Sequences per SFT / PPO step; RM: pairs (2 sequences each) = batch / 2.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay fp32).")
flags.DEFINE_integer("steps", 4, "Timed steps (best reported).")
flags.DEFINE_list("stages", ["sft", "rm", "ppo"], "Which steps to time.")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")

OPTIM = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, decay_steps=0, final_lr_ratio=1.0,
                                       max_grad_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01))


def model_config() -> TransformerConfig:
    """The Llama-style model the flags describe (also used by profile_ops.py --step sft)."""
    return TransformerConfig.llama(vocab_size=FLAGS.vocab, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                                   n_heads=FLAGS.n_heads, d_ff=FLAGS.d_ff, max_len=FLAGS.seq_len, dtype=FLAGS.dtype)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def matmul_weights(config: TransformerConfig, params) -> int:
    """Weights used as matmul operands per token: every kernel (LM head / value head included)
    plus the embedding when it is tied (then it is also the LM head)."""
    count = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = path[-1].key
        if key == "kernel" or (key == "embedding" and config.tie_embeddings and path[0].key == "embed"):
            count += int(np.prod(leaf.shape))
    return count


def train_flops(config: TransformerConfig, params, n_sequences: int, seq_len: int) -> float:
    """6·weights·tokens + 12·layers·sequences·T²·(heads·head_dim) (forward + backward)."""
    tokens = n_sequences * seq_len
    attention = 12 * config.n_layers * n_sequences * seq_len ** 2 * config.n_heads * config.dim_per_head
    return 6.0 * matmul_weights(config, params) * tokens + attention


# ----------------------------------------------------------------------------------------------
# The three steps (loss functions over the shared batch formats)
# ----------------------------------------------------------------------------------------------
def sft_loss_fn(model):
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
        return losses.lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    return loss_fn


def rm_loss_fn(model):
    def loss_fn(params, batch, rng):
        pairs, k, length = batch["input_ids"].shape
        ids, mask = batch["input_ids"].reshape(pairs * k, length), batch["attention_mask"].reshape(pairs * k, length)
        values = model.apply({"params": params}, ids, mask).values
        scores = last_token_values(values, mask).reshape(pairs, k)
        return losses.ranking_loss(scores, batch["ranks"]), {}
    return loss_fn


def ppo_loss_fn(actor, critic, prompt_len: int):
    """Actor clipped surrogate + critic clipped value loss on the response tokens (two models)."""
    def loss_fn(params, batch, rng):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = actor.apply({"params": params["actor"]}, ids, mask).logits[:, prompt_len - 1:-1]
        logprobs = losses.token_logprobs(logits, ids[:, prompt_len:])
        response_mask = mask[:, prompt_len:]
        policy, aux = losses.ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], response_mask, 0.2)
        values = critic.apply({"params": params["critic"]}, ids, mask).values[:, prompt_len - 1:-1]
        value, _ = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], response_mask, 0.2)
        return policy + value, aux
    return loss_fn


def make_batches(stage: str, batch: int, seq_len: int, vocab: int, prompt_len: int) -> dict:
    rng = np.random.RandomState(0)
    ids = rng.randint(1, vocab, (batch, seq_len)).astype(np.int32)
    ones = np.ones_like(ids)
    if stage == "sft":
        loss_mask = ones.copy()
        loss_mask[:, :seq_len // 4] = 0  # prompt tokens are not targets
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": loss_mask}
    if stage == "rm":
        pairs = batch // 2
        return {"input_ids": ids[:2 * pairs].reshape(pairs, 2, seq_len), "attention_mask": ones[:2 * pairs].reshape(
            pairs, 2, seq_len), "ranks": np.tile(np.array([[0, 1]], np.int32), (pairs, 1))}
    n = seq_len - prompt_len
    return {"input_ids": ids, "attention_mask": ones, "old_logprobs": -9.0 + 0.1 * rng.randn(batch, n).astype(np.float32),
            "advantages": rng.randn(batch, n).astype(np.float32), "old_values": rng.randn(batch, n).astype(np.float32),
            "returns": rng.randn(batch, n).astype(np.float32)}


def time_step(loss_fn, params, batch: dict, steps: int) -> tuple:
    """(best seconds per step, XLA flops of the compiled step, compile seconds)."""
    optimizer, schedule = optim.make_optimizer(OPTIM, 1000)
    step = jax.jit(train_state.make_train_step(loss_fn, optimizer, schedule), donate_argnums=(0,))
    # Built by a jitted function so every leaf is its own buffer (the step donates them all).
    state = jax.jit(lambda p, r: train_state.TrainState.create(p, optimizer, r))(params, jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {metrics['loss']}")
    return best, float(cost.get("flops", float("nan"))), compile_s


def main(argv):
    del argv
    info = machine_info()
    print(json.dumps(info), flush=True)
    dtype = jnp.dtype(FLAGS.dtype)
    peak = matmul_peak_flops(dtype)
    print(f"{FLAGS.dtype} matmul peak (2048^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s", flush=True)
    config = model_config()
    prompt_len = FLAGS.seq_len // 4
    lm, scalar = Transformer(config), Transformer(config, heads=("value",))
    lm_params = init_params(lm, jax.random.PRNGKey(0))
    scalar_params = init_params(scalar, jax.random.PRNGKey(1))
    results = {"machine": info, "peak_gflop_s": peak / 1e9, "config": vars(config) if hasattr(config, "__dict__") else {},
               "batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "dtype": FLAGS.dtype, "stages": {}}
    for stage in FLAGS.stages:
        batch = make_batches(stage, FLAGS.batch, FLAGS.seq_len, FLAGS.vocab, prompt_len)
        if stage == "sft":
            loss_fn, params = sft_loss_fn(lm), lm_params
            flops = train_flops(config, lm_params, FLAGS.batch, FLAGS.seq_len)
        elif stage == "rm":
            loss_fn, params = rm_loss_fn(scalar), scalar_params
            flops = train_flops(config, scalar_params, 2 * (FLAGS.batch // 2), FLAGS.seq_len)
        elif stage == "ppo":
            loss_fn, params = ppo_loss_fn(lm, scalar, prompt_len), {"actor": lm_params, "critic": scalar_params}
            flops = (train_flops(config, lm_params, FLAGS.batch, FLAGS.seq_len)
                     + train_flops(config, scalar_params, FLAGS.batch, FLAGS.seq_len))
        else:
            raise app.UsageError(f"--stages: unknown stage {stage!r} (known: sft, rm, ppo)")
        seconds, xla_flops, compile_s = time_step(loss_fn, params, batch, FLAGS.steps)
        row = {"step_s": seconds, "model_gflop": flops / 1e9, "xla_gflop": xla_flops / 1e9,
               "achieved_gflop_s": flops / seconds / 1e9, "mfu": flops / seconds / peak, "compile_s": compile_s,
               "params_m": sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6}
        results["stages"][stage] = row
        print(f"{stage:4s} {row['params_m']:.1f}M params  step {seconds * 1e3:8.1f} ms  model {row['model_gflop']:.1f} "
              f"GFLOP (XLA counts {row['xla_gflop']:.1f})  {row['achieved_gflop_s']:.1f} GFLOP/s  MFU "
              f"{100 * row['mfu']:.1f}%  (compile {compile_s:.1f} s)", flush=True)
        peak = max(peak, matmul_peak_flops(dtype))  # the best peak seen so far (load only ever lowers it)
    # On a shared machine a single peak measurement can land in a burst of load: report MFU against
    # the best peak measured in this process (before and after every step).
    results["peak_gflop_s"] = peak / 1e9
    for stage, row in results["stages"].items():
        row["mfu"] = row["achieved_gflop_s"] * 1e9 / peak
        print(f"{stage:4s} MFU vs the best measured peak {peak / 1e9:.1f} GFLOP/s: {100 * row['mfu']:.1f}%", flush=True)
    results["load_avg_end"] = os.getloadavg()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
