"""Scale planned by compiling, not running (issue 21 §3): per-device bytes of 7B-class programs.

Compiles (never runs) the SFT train step and the PPO and GRPO iterations for a model shape over
N simulated devices with a (data, fsdp, tensor) mesh, bf16 compute, remat, and reads XLA's
memory analysis of the compiled program: arguments (parameters, optimizer state, reference and
RM weights, batch), outputs, temporaries (activations, KV cache of the rollout, gradients);
per-device peak ~ arguments + temporaries + outputs - aliased (donated) bytes. Abstract shapes
only: no weights are made or read.

    python experiments/plan_memory.py --devices 8,64 --models llama2-7b,qwen2-7b --json plan.json
    python experiments/plan_memory.py --devices 8 --models tiny --programs sft,grpo     # quick check
    python experiments/plan_memory.py --devices 8 --programs ppo,grpo --lora_rank 8     # LoRA actor
    python experiments/plan_memory.py --devices 8 --programs ppo,grpo --lora_rank 8 --lora_quantize nf4  # QLoRA

Each device count runs in a subprocess (the simulated device count is fixed when JAX starts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("devices", ["8", "64"], "Simulated device counts.")
flags.DEFINE_list("models", ["llama2-7b", "qwen2-7b"], "Model shapes: llama2-7b, qwen2-7b, tiny.")
flags.DEFINE_list("programs", ["sft", "ppo", "grpo"], "Which programs to compile.")
flags.DEFINE_list("tensor", ["1", "8"], "Tensor-parallel sizes to try (fsdp = devices / tensor).")
flags.DEFINE_integer("lora_rank", 0, "LoRA rank of the RL actor (config.actor.lora; alpha = 2 x rank, every "
                     "projection); 0 = full fine-tuning. SFT is compiled without LoRA either way.")
flags.DEFINE_enum("lora_quantize", "none", ["none", "int8", "nf4"], "QLoRA: the actor's frozen base (and so the "
                  "reference) stored int8 / nf4, block 64 (config.actor.lora.quantize); needs --lora_rank.")
flags.DEFINE_string("json", "", "Write the rows to this JSON file.")
WORKER_ENV = "RLHF_JAX_PLAN_MEMORY_WORKER"  # set for the per-device-count subprocesses (not a user flag)

# configs/common.model_config fields. Llama-2-7B: 32 layers, d 4096, 32 heads, SwiGLU 11008, vocab 32000.
# Qwen2-7B: 28 layers, d 3584, 28 heads / 4 KV heads, SwiGLU 18944, vocab 152064, qkv bias, untied.
MODELS = {
    "llama2-7b": dict(family="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                      max_len=4096),
    "qwen2-7b": dict(family="llama", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     d_ff=18944, max_len=4096, qkv_bias=True),
    "tiny": dict(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=128),
}
# The RL batch: 64 responses of 512 tokens after 512-token prompts; SFT: 64 sequences of 1024 tokens.
SHAPES = {"rl_batch": 64, "prompt_len": 512, "response_len": 512, "sft_batch": 64, "sft_len": 1024}
TINY_SHAPES = {"rl_batch": 8, "prompt_len": 16, "response_len": 16, "sft_batch": 8, "sft_len": 32}


def gib(n: float) -> float:
    """GiB to 2 decimals; below 0.01 GiB (the tiny model) 2 significant digits, not 0.0."""
    value = n / 2 ** 30
    return round(value, 2) if value >= 0.01 else float(f"{value:.2g}")


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"arguments_gib": gib(m.argument_size_in_bytes), "temporaries_gib": gib(m.temp_size_in_bytes),
            "outputs_gib": gib(m.output_size_in_bytes), "aliased_gib": gib(m.alias_size_in_bytes), "peak_gib": gib(peak)}


def rl_config(model: str, algorithm: str, mesh: dict, reward_dir: str, shapes: dict):
    from configs import ppo as ppo_configs

    c = ppo_configs.get_config(f"tiny,{algorithm}")
    c.model.update(**MODELS[model], dtype="bfloat16", remat=True)
    c.reward.init.update(source="hf", path=reward_dir)
    if algorithm == "ppo":
        c.critic.update(type="token", init={"source": "reward", "path": ""})
    c.rewards.rm_weight, c.rewards.rules.target_token.weight = 1.0, 0.0
    c.rollout.update(batch_size=shapes["rl_batch"], prompt_len=shapes["prompt_len"],
                     max_new_tokens=shapes["response_len"])
    c.ppo.update(epochs=1, num_minibatches=4)
    c.mesh.update(**mesh)
    c.actor.lora.update(rank=FLAGS.lora_rank, alpha=2.0 * FLAGS.lora_rank, quantize=FLAGS.lora_quantize)
    return c


def compile_rl(model: str, algorithm: str, mesh_fields: dict, reward_dir: str, shapes: dict) -> dict:
    from rlhf_jax import algorithms, sharding
    from rlhf_jax.data.rollout_data import abstract_batch
    from rlhf_jax.trainers import ppo

    c = rl_config(model, algorithm, mesh_fields, reward_dir, shapes)
    mesh = sharding.make_mesh(dict(c.mesh))
    models = ppo.build_models(c)
    optimizers = ppo.make_optimizers(c, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False, penalty=False)
    state = algorithms.abstract_state(models, optimizers, state_sh, c.kl.coef, False)
    step = ppo.jit_iteration(models, ppo.settings_from_config(c), optimizers, state_sh, mesh, with_ptx=False)
    return analysis(step.lower(state, abstract_batch(c, mesh)).compile())


def compile_sft(model: str, mesh_fields: dict, shapes: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import common
    from rlhf_jax import loading, losses, optim, sharding
    from rlhf_jax.models import Transformer
    from rlhf_jax.trainers import state as state_lib

    mesh = sharding.make_mesh(mesh_fields)
    model_def = Transformer(loading.transformer_config(common.model_config(**MODELS[model], dtype="bfloat16",
                                                                          remat=True)))
    optimizer, schedule = optim.make_optimizer(common.optim_config(), 1000)
    param_sh = sharding.param_shardings(model_def, mesh)
    params = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    loading.param_shapes(model_def), param_sh)

    def loss_fn(p, batch, rng):
        logits = model_def.apply({"params": p}, batch["input_ids"], batch["attention_mask"]).logits
        return losses.lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    step = state_lib.make_train_step(loss_fn, optimizer, schedule)
    state_sh = state_lib.train_state_shardings(optimizer, params, param_sh, mesh)
    state = jax.eval_shape(lambda p: state_lib.TrainState.create(p, optimizer, jax.random.PRNGKey(0)), params)
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                                   state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((shapes["sft_batch"], shapes["sft_len"]), jnp.int32, sharding=batch_sh)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    jitted = state_lib.jit_train_step(step, state_sh, batch_sh, None)
    return analysis(jitted.lower(state, batch).compile())


def worker(devices: int) -> list[dict]:
    from rlhf_jax.models import hf_config
    from configs import common
    from rlhf_jax import loading

    rows = []
    for model in FLAGS.models:
        shapes = TINY_SHAPES if model == "tiny" else SHAPES
        with tempfile.TemporaryDirectory() as reward_dir:  # the RM's config.json: an architecture, no weights
            cfg = loading.transformer_config(common.model_config(**MODELS[model]))
            hf = hf_config.config_to_hf(cfg, ("value",))
            with open(os.path.join(reward_dir, "config.json"), "w") as f:
                json.dump(hf, f)
            for tensor in (int(t) for t in FLAGS.tensor):
                if devices % tensor:
                    continue
                mesh = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
                for program in FLAGS.programs:
                    if program == "sft" and FLAGS.lora_rank:
                        continue
                    row = {"model": model, "devices": devices, "mesh": mesh, "program": program,
                           "lora_rank": FLAGS.lora_rank, "lora_quantize": FLAGS.lora_quantize}
                    try:
                        row.update(compile_sft(model, mesh, shapes) if program == "sft"
                                   else compile_rl(model, program, mesh, reward_dir, shapes))
                    except Exception as error:  # noqa: BLE001 — a program that does not compile is a result too
                        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if os.environ.get(WORKER_ENV):
        worker(int(os.environ[WORKER_ENV]))
        return
    if FLAGS.lora_quantize != "none" and not FLAGS.lora_rank:
        raise app.UsageError(f"--lora_quantize={FLAGS.lora_quantize} needs --lora_rank > 0 (QLoRA quantises the "
                             "LoRA actor's frozen base)")
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown} (choose from {', '.join(MODELS)})")
    for devices in (int(d) for d in FLAGS.devices):
        skipped = [t for t in FLAGS.tensor if devices % int(t)]
        if skipped:
            print(f"--tensor {','.join(skipped)}: skipped on {devices} devices (does not divide {devices})")
    rows = []
    for devices in (int(d) for d in FLAGS.devices):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
               WORKER_ENV: str(devices)}
        args = [sys.executable, os.path.abspath(__file__), f"--models={','.join(FLAGS.models)}",
                f"--programs={','.join(FLAGS.programs)}", f"--tensor={','.join(FLAGS.tensor)}",
                f"--lora_rank={FLAGS.lora_rank}", f"--lora_quantize={FLAGS.lora_quantize}"]
        out = subprocess.run(args, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"worker for {devices} devices failed:\n{out.stderr[-3000:]}")
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print("| model | devices | mesh (fsdp x tensor) | program | arguments GiB | temporaries GiB | peak GiB/device |")
    print("|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        mesh = f"{r['mesh']['fsdp']} x {r['mesh']['tensor']}"
        if "error" in r:
            print(f"| {r['model']} | {r['devices']} | {mesh} | {r['program']} | {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['devices']} | {mesh} | {r['program']} | {r['arguments_gib']} | "
                  f"{r['temporaries_gib']} | {r['peak_gib']} |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
