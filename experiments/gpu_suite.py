"""The accelerator suite in one call (issue 21 §2): what a lent GPU is measured on.

Parts (all on random weights of real shapes; parameters fp32, compute in --dtype):
- gen:  generation tokens/s, ours vs transformers' `generate` on the same device and the identical
        model (exported with `save_pretrained`; transformers in the same compute dtype), batch 1..256,
        full-length prompts, no EOS stop; the marginal decode step (between N/2 and N new tokens)
        against its HBM roofline: (parameter bytes + KV-cache bytes) / measured read bandwidth,
        or FLOPs / measured matmul peak when that is longer.
- rl:   one PPO iteration (separate critic from the RM) and one GRPO iteration (group 4) through
        `trainers.ppo.train` with `profile_phases`: time of the rollout (sampling, scoring,
        log-probs, advantages) and of the update (epochs x minibatches), update MFU against the
        measured matmul peak (analytic FLOPs, experiments/bench_mfu.py), peak device memory.
- sft:  one SFT train step's MFU (bench_mfu's step: gradients, clipping, AdamW).

    python experiments/gpu_suite.py --out /tmp/gpu_suite            # accelerator: bf16, GPT-2 124M, Qwen2-0.5B
    python experiments/gpu_suite.py --mode cpu --out /tmp/cpu_suite  # tiny shapes, fp32 (tests/test_gpu_suite.py)

Writes OUT/suite.json (every number, the machine and versions) and OUT/suite.md (the tables for
docs/benchmarks.md). The first run of each program (compilation) is never timed.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_* helpers

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_mfu  # noqa: E402  (defines its own flags; this script's flag names differ)
from bench_generation import (decode_step_cost, interleaved_best, machine_info, matmul_peak_flops,  # noqa: E402
                              n_params, ours_runner, prompts, read_bandwidth)
from configs import common  # noqa: E402
from configs import ppo as ppo_configs  # noqa: E402
from rlhf_jax import loading  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params, save_pretrained  # noqa: E402
from rlhf_jax.trainers import ppo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "gpu", ["gpu", "cpu"], "gpu: real shapes in bf16; cpu: tiny shapes in fp32 (a smoke run).")
flags.DEFINE_string("out", None, "Directory for suite.json and suite.md.", required=True)
flags.DEFINE_list("parts", ["gen", "rl", "sft"], "Which parts to run.")
flags.DEFINE_integer("repeats", 3, "Timed runs per generation setting (best reported).")

MODES = {
    "gpu": dict(dtype="bfloat16", device="cuda",
                models={"gpt2-124m": dict(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                                          d_ff=3072, max_len=1024),
                        "qwen2-0.5b": dict(family="llama", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                                           n_kv_heads=2, d_ff=4864, max_len=1024, qkv_bias=True)},
                batches=(1, 16, 64, 256), prompt_len=128, new_tokens=256,
                rl=dict(model="qwen2-0.5b", batch=64, prompt_len=256, response_len=256, iterations=3),
                sft=dict(model="qwen2-0.5b", batch=16, seq_len=512)),
    "cpu": dict(dtype="float32", device="cpu",
                models={"tiny": dict(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                     max_len=64)},
                batches=(2,), prompt_len=8, new_tokens=8,
                rl=dict(model="tiny", batch=8, prompt_len=8, response_len=8, iterations=2),
                sft=dict(model="tiny", batch=4, seq_len=32)),
}


def model_fields(mode: dict, name: str) -> dict:
    """configs/common.model_config fields of model `name` in the mode's compute dtype."""
    return {**mode["models"][name], "dtype": mode["dtype"]}


def transformer_config(mode: dict, name: str) -> TransformerConfig:
    return loading.transformer_config(common.model_config(**model_fields(mode, name)))


def peak_memory_bytes() -> float:
    """Peak bytes in use on the first device since start-up (NaN where the backend keeps no stats)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


# ----------------------------------------------------------------------------------------------
# Generation: ours vs transformers, and the decode step vs its roofline
# ----------------------------------------------------------------------------------------------
def torch_runner(ref, ids: np.ndarray, mask: np.ndarray, n_new: int, device: str):
    import torch

    ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)
    mask_t = torch.from_numpy(mask.astype(np.int64)).to(device)

    def run():
        with torch.inference_mode():
            out = ref.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.shape

    return run


def load_transformers(model: Transformer, params, dtype: str, device: str):
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as export_dir:
        save_pretrained(model, params, export_dir,
                        extra_config={"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0})
        ref = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=getattr(torch, dtype)).eval()
    ref = ref.to(device)
    ref.generation_config.update(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    return ref


def generation_part(mode: dict, peak: float) -> list[dict]:
    rows = []
    for name in mode["models"]:
        config = transformer_config(mode, name)
        model = Transformer(config)
        params = init_params(model, jax.random.PRNGKey(0))
        ref = load_transformers(model, params, mode["dtype"], mode["device"])
        n, half = mode["new_tokens"], mode["new_tokens"] // 2
        for batch in mode["batches"]:
            ids, mask = prompts(config.vocab_size, batch, mode["prompt_len"])
            runners = {"ours": ours_runner(model, params, ids, mask, n), "ours_half": ours_runner(model, params, ids,
                                                                                                  mask, half),
                       "transformers": torch_runner(ref, ids, mask, n, mode["device"])}
            best = interleaved_best(runners, FLAGS.repeats)
            step = (best["ours"] - best["ours_half"]) / (n - half)
            context = mode["prompt_len"] + (n + half) // 2
            cost = decode_step_cost(config, params, batch, context)
            kv_bytes = cost["kv_bytes"] * jnp.dtype(config.compute_dtype).itemsize / 4  # the cache is in the compute dtype
            bytes_read = cost["param_bytes"] + kv_bytes
            roofline = max(bytes_read / read_bandwidth(int(bytes_read)), cost["flops"] / peak)
            rows.append(dict(model=name, params_m=n_params(params) / 1e6, batch=batch, new_tokens=n,
                             ours_tok_s=batch * n / best["ours"], transformers_tok_s=batch * n / best["transformers"],
                             speedup=best["transformers"] / best["ours"], step_ms=1e3 * step,
                             roofline_ms=1e3 * roofline, x_roofline=step / roofline))
            r = rows[-1]
            print(f"[gen {name}] B={batch:4d}: ours {r['ours_tok_s']:10.0f} tok/s, transformers "
                  f"{r['transformers_tok_s']:10.0f} tok/s ({r['speedup']:.2f}x); decode step {r['step_ms']:.3f} ms = "
                  f"{r['x_roofline']:.2f}x its roofline ({r['roofline_ms']:.3f} ms)", flush=True)
        del ref
    return rows


# ----------------------------------------------------------------------------------------------
# RL iterations (PPO, GRPO) and the SFT step
# ----------------------------------------------------------------------------------------------
def rl_config(mode: dict, algorithm: str, reward_dir: str):
    rl = mode["rl"]
    c = ppo_configs.get_config(f"tiny,{algorithm}")
    c.model.update(**model_fields(mode, rl["model"]))
    c.reward.init.update(source="hf", path=reward_dir)
    if algorithm == "ppo":
        c.critic.update(type="token", init={"source": "reward", "path": ""})
    c.rewards.rm_weight, c.rewards.rules.target_token.weight = 1.0, 0.0
    c.rollout.update(batch_size=rl["batch"], prompt_len=rl["prompt_len"], max_new_tokens=rl["response_len"],
                     temperature=1.0, eos_id=-1)
    c.data.min_prompt_len = rl["prompt_len"]
    c.ppo.update(epochs=2, num_minibatches=2)
    c.kl.update(coef=0.05, adaptive=False)
    c.num_steps, c.checkpoint.save_every, c.profile_phases = rl["iterations"], 10 ** 6, True
    c.fast_compile = FLAGS.mode == "cpu"  # the smoke run's compile time is what it waits for
    return c


def rl_part(mode: dict, peak: float) -> list[dict]:
    rl = mode["rl"]
    config = transformer_config(mode, rl["model"])
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        reward = Transformer(config, heads=("value",))
        reward_params = init_params(reward, jax.random.PRNGKey(1))
        reward_dir = os.path.join(directory, "reward")
        save_pretrained(reward, reward_params, reward_dir, extra_config={"pad_token_id": 0})
        for algorithm in ("ppo", "grpo"):
            c = rl_config(mode, algorithm, reward_dir)
            workdir = os.path.join(directory, algorithm)
            ppo.train(c, workdir)
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                timed = [json.loads(line) for line in f][1:]  # the first iteration compiles
            phase = {name: statistics.median(r[f"time/{name}"] for r in timed) for name in ("rollout", "update")}
            seq = rl["prompt_len"] + rl["response_len"]
            networks = 2 if algorithm == "ppo" else 1  # actor (+ critic of the same shape)
            flops = c.ppo.epochs * networks * bench_mfu.train_flops(config, reward_params, rl["batch"], seq)
            rows.append(dict(algorithm=algorithm, model=rl["model"], batch=rl["batch"], seq_len=seq,
                             rollout_s=phase["rollout"], update_s=phase["update"],
                             update_mfu=flops / phase["update"] / peak, peak_memory_gib=peak_memory_bytes() / 2 ** 30))
            r = rows[-1]
            print(f"[rl {algorithm}] rollout {r['rollout_s']:.3f} s, update {r['update_s']:.3f} s (MFU "
                  f"{100 * r['update_mfu']:.1f}%), peak memory {r['peak_memory_gib']:.2f} GiB", flush=True)
    return rows


def sft_part(mode: dict, peak: float) -> dict:
    s = mode["sft"]
    config = transformer_config(mode, s["model"])
    model = Transformer(config)
    params = init_params(model, jax.random.PRNGKey(0))
    batch = bench_mfu.make_batches("sft", s["batch"], s["seq_len"], config.vocab_size, s["seq_len"] // 4)
    seconds, _, compile_s = bench_mfu.time_step(bench_mfu.sft_loss_fn(model), params, batch, steps=3)
    flops = bench_mfu.train_flops(config, params, s["batch"], s["seq_len"])
    row = dict(model=s["model"], batch=s["batch"], seq_len=s["seq_len"], step_s=seconds, mfu=flops / seconds / peak,
               compile_s=compile_s)
    print(f"[sft] step {1e3 * seconds:.1f} ms, MFU {100 * row['mfu']:.1f}%", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Device: {', '.join(m['devices'][:1])} ({m['backend']}), {result['dtype']}; measured matmul peak "
             f"{result['peak_tflop_s']:.1f} TFLOP/s; jax {m['versions'].get('jax')}, torch "
             f"{m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}.", ""]
    if result.get("gen"):
        lines += ["| model | batch | ours tok/s | transformers tok/s | ours / transformers | decode step ms | "
                  "x HBM roofline |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['ours_tok_s']:.0f} | {r['transformers_tok_s']:.0f} | "
                  f"{r['speedup']:.2f} | {r['step_ms']:.3f} | {r['x_roofline']:.2f} |" for r in result["gen"]]
        lines.append("")
    if result.get("rl"):
        lines += ["| iteration | model | batch | tokens | rollout s | update s | update MFU | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['algorithm']} | {r['model']} | {r['batch']} | {r['seq_len']} | {r['rollout_s']:.3f} | "
                  f"{r['update_s']:.3f} | {100 * r['update_mfu']:.1f}% | {r['peak_memory_gib']:.2f} |"
                  for r in result["rl"]]
        lines.append("")
    if result.get("sft"):
        r = result["sft"]
        lines.append(f"SFT step ({r['model']}, batch {r['batch']} x {r['seq_len']}): {1e3 * r['step_s']:.1f} ms, "
                     f"MFU {100 * r['mfu']:.1f}%.")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mode = MODES[FLAGS.mode]
    unknown = set(FLAGS.parts) - {"gen", "rl", "sft"}
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)} (known: gen, rl, sft)")
    os.makedirs(FLAGS.out, exist_ok=True)
    peak = matmul_peak_flops(jnp.dtype(mode["dtype"]), n=4096 if FLAGS.mode == "gpu" else 512)
    result = {"mode": FLAGS.mode, "dtype": mode["dtype"], "machine": machine_info(), "peak_tflop_s": peak / 1e12}
    print(json.dumps(result), flush=True)
    if "gen" in FLAGS.parts:
        result["gen"] = generation_part(mode, peak)
    if "rl" in FLAGS.parts:
        result["rl"] = rl_part(mode, peak)
    if "sft" in FLAGS.parts:
        result["sft"] = sft_part(mode, peak)
    with open(os.path.join(FLAGS.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(FLAGS.out, "suite.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
