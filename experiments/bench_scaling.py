"""Scaling benchmarks (issue 8).

--part length : time per generated token vs generated length 32..512 (flat with a KV cache: a
                decode step reads the cache once, so only its attention part grows with length).
--part batch  : generation time vs batch size at a fixed response length (new tokens/s per batch).
--part memory : per-device parameter + AdamW-state bytes vs FSDP size on 8 simulated CPU devices
                (should shrink ~1/N). Bytes come from the trainers' shardings
                (`rlhf_jax.sharding.param_shardings`, `train_state.train_state_shardings`) via each
                array's per-device shard shape; for the smallest model the state is also built on
                the devices and its addressable shards are summed, to check the arithmetic.

    python experiments/bench_scaling.py                      # all parts
    python experiments/bench_scaling.py --part length --lengths 32,64 --batches 1 --repeats 1
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_generation helpers

SIMULATED_DEVICES = 8
if "--part=memory" in sys.argv or ("--part" in sys.argv and "memory" in sys.argv):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={SIMULATED_DEVICES}")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench_generation import MODELS, best_seconds, machine_info, prompts  # noqa: E402
from rlhf_jax import generation, sharding  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params  # noqa: E402
from rlhf_jax import optim  # noqa: E402
from rlhf_jax.trainers import state as train_state  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "length", "batch", "memory"], "Which measurement.")
flags.DEFINE_string("model", "tiny", "bench_generation preset for the length and batch parts.")
flags.DEFINE_list("lengths", ["32", "64", "128", "256", "512"], "Generated lengths (length part).")
flags.DEFINE_list("batches", ["1", "16"], "Batch sizes of the length part.")
flags.DEFINE_list("batch_sweep", ["1", "4", "16", "64"], "Batch sizes of the batch part.")
flags.DEFINE_integer("batch_sweep_tokens", 64, "New tokens in the batch part.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length.")
flags.DEFINE_integer("repeats", 3, "Timed runs (best reported).")
flags.DEFINE_string("json", "", "Write the results to this JSON file (with --part all, the memory part goes "
                    "to JSON.memory.json).")

OPTIM = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, decay_steps=0, final_lr_ratio=1.0,
                                       max_grad_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01))
MEMORY_MODELS = {
    "tiny (7.1M)": MODELS["tiny"],
    "small (23M)": MODELS["small"],
    "gpt2-124M": TransformerConfig.gpt2(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                                        max_len=1024),
}


# ----------------------------------------------------------------------------------------------
# Generation time vs length and batch
# ----------------------------------------------------------------------------------------------
def time_generate(model, params, batch: int, n_new: int, prompt_len: int, repeats: int) -> float:
    ids, mask = (jnp.asarray(a) for a in prompts(model.config.vocab_size, batch, prompt_len))
    run = lambda: generation.generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=n_new,
                                      eos_id=None).tokens
    jax.block_until_ready(run())  # compile
    return best_seconds(run, repeats, warmup=0)


def length_part(model, params) -> list:
    rows = []
    for batch in (int(b) for b in FLAGS.batches):
        times = {}
        for n_new in (int(n) for n in FLAGS.lengths):
            times[n_new] = time_generate(model, params, batch, n_new, FLAGS.prompt_len, FLAGS.repeats)
            per_token = 1e3 * times[n_new] / n_new
            rows.append(dict(batch=batch, new_tokens=n_new, total_ms=1e3 * times[n_new], ms_per_token=per_token))
            print(f"length B={batch:3d} N={n_new:4d}: {1e3 * times[n_new]:9.1f} ms total, {per_token:6.2f} ms/token",
                  flush=True)
        per_token = [r["ms_per_token"] for r in rows if r["batch"] == batch]
        print(f"length B={batch:3d}: max/min ms per token = {max(per_token) / min(per_token):.2f} "
              "(target < 1.5)", flush=True)
    return rows


def batch_part(model, params) -> list:
    rows = []
    n_new = FLAGS.batch_sweep_tokens
    for batch in (int(b) for b in FLAGS.batch_sweep):
        seconds = time_generate(model, params, batch, n_new, FLAGS.prompt_len, FLAGS.repeats)
        rows.append(dict(batch=batch, new_tokens=n_new, total_ms=1e3 * seconds, tok_s=batch * n_new / seconds))
        print(f"batch B={batch:3d} N={n_new}: {1e3 * seconds:9.1f} ms, {batch * n_new / seconds:8.0f} new tokens/s",
              flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Per-device state bytes vs FSDP size
# ----------------------------------------------------------------------------------------------
def state_shapes_and_shardings(config: TransformerConfig, fsdp: int):
    mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp, "tensor": 1})
    model = Transformer(config)
    optimizer, _ = optim.make_optimizer(OPTIM, 1000)
    params_shape = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    param_sh = sharding.param_shardings(model, mesh)
    state_sh = train_state.train_state_shardings(optimizer, params_shape, param_sh, mesh)
    state_shape = jax.eval_shape(lambda p: train_state.TrainState.create(p, optimizer, jax.random.PRNGKey(0)), params_shape)
    return model, optimizer, params_shape, state_shape, state_sh


def per_device_bytes(state_shape, state_sh) -> int:
    """Bytes one device holds: each leaf's shard shape under its sharding."""
    leaves = jax.tree_util.tree_leaves(state_shape)
    shardings = jax.tree_util.tree_leaves(state_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(int(np.prod(sh.shard_shape(leaf.shape))) * leaf.dtype.itemsize for leaf, sh in zip(leaves, shardings))


def allocated_bytes_on_device0(config: TransformerConfig, fsdp: int) -> int:
    """Build the train state on the mesh and sum the bytes of device 0's shards."""
    model, optimizer, _, _, state_sh = state_shapes_and_shardings(config, fsdp)
    params = init_params(model, jax.random.PRNGKey(0))
    state = train_state.init_train_state(params, optimizer, jax.random.PRNGKey(0), state_sh)
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
               for shard in leaf.addressable_shards if shard.device == device)


def memory_part() -> list:
    if jax.device_count() < SIMULATED_DEVICES:
        raise RuntimeError(f"memory part needs {SIMULATED_DEVICES} devices, found {jax.device_count()}")
    rows = []
    for name, config in MEMORY_MODELS.items():
        base = None
        for fsdp in (1, 2, 4, 8):
            _, _, _, state_shape, state_sh = state_shapes_and_shardings(config, fsdp)
            nbytes = per_device_bytes(state_shape, state_sh)
            base = base or nbytes
            row = dict(model=name, fsdp=fsdp, data=SIMULATED_DEVICES // fsdp, mbytes=nbytes / 1e6,
                       fraction=nbytes / base, ideal=1 / fsdp)
            if name.startswith("tiny") and fsdp in (1, 8):
                row["allocated_mbytes"] = allocated_bytes_on_device0(config, fsdp) / 1e6
            rows.append(row)
            print(f"memory {name:12s} fsdp={fsdp} data={SIMULATED_DEVICES // fsdp}: {nbytes / 1e6:8.1f} MB per device "
                  f"({row['fraction']:.3f} of fsdp=1; ideal {1 / fsdp:.3f})"
                  + (f"; allocated {row['allocated_mbytes']:.1f} MB" if "allocated_mbytes" in row else ""),
                  flush=True)
    return rows


def main(argv):
    del argv
    results = {"machine": machine_info()}
    print(json.dumps(results["machine"]), flush=True)
    if FLAGS.part == "memory":
        results["memory"] = memory_part()
    else:
        if FLAGS.part in ("all", "length", "batch"):
            model = Transformer(MODELS[FLAGS.model])
            params = init_params(model, jax.random.PRNGKey(0))
            if FLAGS.part in ("all", "length"):
                results["length"] = length_part(model, params)
            if FLAGS.part in ("all", "batch"):
                results["batch"] = batch_part(model, params)
        if FLAGS.part == "all":  # a fresh process: the device count is fixed at JAX start-up
            command = [sys.executable, os.path.abspath(__file__), "--part=memory"]
            if FLAGS.json:
                command.append(f"--json={FLAGS.json}.memory.json")
            subprocess.run(command, check=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
