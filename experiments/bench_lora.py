"""Full fine-tune vs LoRA vs QLoRA (int8 / nf4 base, block 64): trainable parameters, parameter and
AdamW-state bytes per device, the compiled SFT step's memory analysis, and the SFT step time.

Per-device bytes come from the shardings the trainers use (`rlhf_jax.sharding` rules on a
data=1, fsdp=N mesh of N fake CPU devices) applied to abstract shapes: nothing is materialised,
so the Qwen2-0.5B shape needs no weights. 4-bit codes (nf4) count half a byte, their nominal
width; XLA:CPU's buffers give each one a byte (`lora_state.memory_report` shows those real bytes).
Step time and the compiled program's memory analysis
(XLA:CPU's, arguments/temporaries) are measured for the models small enough to run here.

    python experiments/bench_lora.py                      # tiny preset + Qwen2-0.5B shape, fsdp=8
    python experiments/bench_lora.py --rank 16 --steps 5
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from rlhf_jax import loading, lora, losses, optim, sharding  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig  # noqa: E402
from rlhf_jax.trainers import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rank", 8, "LoRA rank r (alpha = 2r), all attention and MLP projections")
flags.DEFINE_integer("fsdp", 8, "devices on the fsdp axis (the per-device columns)")
flags.DEFINE_integer("steps", 5, "timed SFT steps (best one reported) for the models that run here")
flags.DEFINE_integer("batch", 16, "sequences per SFT step")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")

MODELS = {
    # configs/pipeline.py's models (vocabulary of the built-in task's tokenizer)
    "tiny (pipeline)": (TransformerConfig(vocab_size=120, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=64),
                        True),
    # Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B): abstract only
    "Qwen2-0.5B shape": (TransformerConfig.llama(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                                 d_ff=4864, qkv_bias=True, tie_embeddings=True, max_len=32768,
                                                 rope_theta=1e6), False),
}


def per_device(shapes, shardings) -> float:
    """Bytes on the most loaded device of a tree of ShapeDtypeStructs under `shardings` (4-bit: 0.5)."""
    def width(dtype):
        return 0.5 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(dtype).itemsize
    return sum(width(shape.dtype) * math.prod(sh.shard_shape(shape.shape))
               for shape, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def measure(name: str, config: TransformerConfig, runnable: bool, mesh, specs: dict) -> list[dict]:
    optim_cfg = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, decay_steps=0, final_lr_ratio=0.1,
                                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
    optimizer, schedule = optim.make_optimizer(optim_cfg, 100)
    base = Transformer(config)
    rows = []
    for mode, spec in specs.items():
        model = base if spec is None else lora.lora_model(base, spec)
        shapes, shardings = loading.param_shapes(model), sharding.param_shardings(model, mesh)
        trainable_shapes, trainable_sh = shapes, shardings
        if spec is not None:
            trainable_shapes, trainable_sh = lora.split(shapes, spec)[0], lora.split(shardings, spec)[0]
        opt_shapes = jax.eval_shape(optimizer.init, trainable_shapes)
        opt_sh = optim.opt_state_shardings(optimizer, trainable_shapes, trainable_sh, mesh)
        row = {"model": name, "mode": mode, "params": lora.count(shapes), "trainable": lora.count(trainable_shapes),
               "param_MiB_per_device": per_device(shapes, shardings) / 2**20,
               "opt_state_MiB_per_device": per_device(opt_shapes, opt_sh) / 2**20}
        if runnable:
            row.update(time_sft_step(model, spec is not None, spec, optimizer, schedule, mesh, shardings,
                                     trainable_sh))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def time_sft_step(model, is_lora, spec, optimizer, schedule, mesh, full_sh, trainable_sh) -> dict:
    """Best SFT step time and the compiled step's memory analysis (state donated, as the trainer)."""
    params = jax.jit(lambda r: loading.init_params(model, r), out_shardings=full_sh)(jax.random.PRNGKey(0))
    trainable, frozen = lora.split(params, spec) if is_lora else (params, {})
    frozen_sh = lora.split(full_sh, spec)[1] if is_lora else {}

    def step(state, batch, frozen):  # the frozen base: an undonated argument, as in trainers/lora_state.py
        def loss_fn(p, b, rng):
            out = model.apply({"params": lora.combine(p, frozen) if is_lora else p}, b["input_ids"])
            return losses.lm_loss(out.logits, b["input_ids"], b["loss_mask"])[0], {}
        return state_lib.make_train_step(loss_fn, optimizer, schedule)(state, batch)

    state_sh = state_lib.train_state_shardings(optimizer, jax.eval_shape(lambda: trainable), trainable_sh, mesh)
    state = state_lib.init_train_state(trainable, optimizer, jax.random.PRNGKey(1), state_sh)
    ids = jax.random.randint(jax.random.PRNGKey(2), (FLAGS.batch, FLAGS.seq_len), 0, model.config.vocab_size)
    batch = sharding.shard_batch({"input_ids": ids, "loss_mask": jnp.ones_like(ids)}, mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    stats = jitted.lower(state, batch, frozen).compile().memory_analysis()
    # Timed through the jit dispatch, not the AOT executable: that one asks for packed uint4 argument
    # layouts, which the nf4 codes placed by an earlier jit do not have (XLA:CPU gives them a byte each).
    compiled = jitted
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    out = {"step_ms": 1000 * best}
    if stats is not None:
        out.update(compiled_args_MiB=stats.argument_size_in_bytes / 2**20,
                   compiled_temp_MiB=stats.temp_size_in_bytes / 2**20)
    return out


def main(argv):
    del argv
    mesh = sharding.make_mesh({"data": 1, "fsdp": FLAGS.fsdp, "tensor": 1}, devices=jax.devices()[:FLAGS.fsdp])
    specs = {"full": None, f"LoRA r={FLAGS.rank}": lora.LoraSpec(rank=FLAGS.rank, alpha=2.0 * FLAGS.rank)}
    for quantize in ("int8", "nf4"):
        specs[f"QLoRA {quantize} r={FLAGS.rank}"] = lora.LoraSpec(rank=FLAGS.rank, alpha=2.0 * FLAGS.rank,
                                                                quantize=quantize, quantize_block=64)
    rows = []
    for name, (config, runnable) in MODELS.items():
        rows += measure(name, config, runnable, mesh, specs)
    print("\n| model | mode | params | trainable | params MiB/device | AdamW state MiB/device | SFT step ms | "
          "compiled temporaries MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
        temp = f"{r['compiled_temp_MiB']:.1f}" if "compiled_temp_MiB" in r else "-"
        share = 100 * r["trainable"] / r["params"]
        print(f"| {r['model']} | {r['mode']} | {r['params']:,} | {r['trainable']:,} ({share:.2f}%) "
              f"| {r['param_MiB_per_device']:.2f} | {r['opt_state_MiB_per_device']:.2f} | {step} | {temp} |")


if __name__ == "__main__":
    app.run(main)
