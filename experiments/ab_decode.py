"""A/B of decode-code variants in one process: the same `generation.sample` compiled once per
variant, the variants' calls alternating (a, b, a, b, ...) so load from other processes hits all of
them alike; medians over rounds. Also checks that the variants sample the same tokens with the
same log-probs (same RNG).

Variants (each a replacement for one function that `generation.sample` calls while it is traced):
- `fused`: the library as it is (q/k/v and gate/up fused at decode time, `decode.fuse_projections`);
- `separate`: `decode.fuse_projections` replaced by the identity (one product per projection);
- `qkv` / `gate_up`: only q/k/v, or only gate/up, fused.

    python experiments/ab_decode.py --models tiny,tiny_llama --batches 16,64 --rounds 7

Per (model, batch): ms per new token of one whole `generate` call at the longest N (prefill
included), the marginal decode step (T(N_long) - T(N_short)) / (N_long - N_short) (medians over
rounds), and the paired ratio: the median over rounds of this variant's whole-call time at the
longest N over the first variant's in the same round.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench helpers

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_generation import MODELS, machine_info, prompts  # noqa: E402
from rlhf_jax import generation  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, decode, init_params  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["tiny", "tiny_llama"], "bench_generation.MODELS presets, or tiny_llama.")
flags.DEFINE_list("batches", ["16", "64"], "Batch sizes.")
flags.DEFINE_list("new_tokens", ["32", "128"], "Two new-token counts (marginal step between them).")
flags.DEFINE_list("variants", ["separate", "fused"], "Variants (see the module docstring), in call order.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (all rows full).")
flags.DEFINE_integer("rounds", 7, "Alternating rounds; medians over them.")
flags.DEFINE_string("json", "", "Write the rows to this JSON file.")

# The generation benchmark's tiny model with the Llama family's blocks (RoPE, RMSNorm, SwiGLU, untied).
LLAMA = {"tiny_llama": TransformerConfig.llama(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024,
                                               max_len=1024)}
VARIANTS = {"fused": decode.fuse_projections, "separate": lambda params: params,
            "qkv": functools.partial(decode.fuse_projections, modules=("attn",)),
            "gate_up": functools.partial(decode.fuse_projections, modules=("mlp",))}


def compiled_variant(variant: str, model, params, ids, mask, n_new: int):
    """`generation.sample` jitted and traced with `variant`'s function in place; returns a thunk."""
    config = generation.SamplingConfig(max_new_tokens=n_new, temperature=1.0)
    fn = jax.jit(functools.partial(generation.sample, model, config=config))
    rng = jax.random.PRNGKey(0)
    with mock.patch.object(decode, "fuse_projections", VARIANTS[variant]):
        jax.block_until_ready(fn(params, ids, mask, rng))  # traces and compiles under the patch
    return lambda: fn(params, ids, mask, rng)


def ab_row(name: str, batch: int) -> dict:
    config = MODELS.get(name) or LLAMA[name]
    model = Transformer(config)
    params = init_params(model, jax.random.PRNGKey(0))
    ids, mask = (jnp.asarray(x) for x in prompts(config.vocab_size, batch, FLAGS.prompt_len))
    short, long = sorted(int(n) for n in FLAGS.new_tokens)
    runs = {(v, n): compiled_variant(v, model, params, ids, mask, n) for v in FLAGS.variants for n in (short, long)}
    outs = {v: runs[(v, long)]() for v in FLAGS.variants}
    first = outs[FLAGS.variants[0]]
    same_tokens = all(bool(jnp.all(o.tokens == first.tokens)) for o in outs.values())
    max_lp_diff = max(float(jnp.max(jnp.abs(o.logprobs - first.logprobs))) for o in outs.values())
    times = {key: [] for key in runs}
    for _ in range(FLAGS.rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[key].append(time.perf_counter() - start)
    row = {"model": name, "batch": batch, "same_tokens": same_tokens, "max_logprob_diff": max_lp_diff,
           "load_avg": os.getloadavg()}
    for v in FLAGS.variants:
        marginal = [(t_long - t_short) / (long - short) for t_short, t_long in zip(times[(v, short)], times[(v, long)])]
        row[v] = {"ms_per_token": 1e3 * statistics.median(times[(v, long)]) / long,
                  "marginal_step_ms": 1e3 * statistics.median(marginal)}
        # paired: this variant's whole-call time over the first variant's in the same round
        row[v]["paired_ratio"] = statistics.median(
            t / t0 for t, t0 in zip(times[(v, long)], times[(FLAGS.variants[0], long)]))
    print(f"[{name} B={batch}] " + "; ".join(
        f"{v}: {row[v]['ms_per_token']:.2f} ms/token, step {row[v]['marginal_step_ms']:.2f} ms, "
        f"paired ratio {row[v]['paired_ratio']:.2f}x" for v in FLAGS.variants)
          + f"; same tokens {same_tokens}, max |dlogprob| {max_lp_diff:.1e}, load {row['load_avg'][0]:.1f}",
          flush=True)
    return row


def main(argv):
    del argv
    print(json.dumps(machine_info()), flush=True)
    print(f"settings: prompt {FLAGS.prompt_len}, new tokens {FLAGS.new_tokens}, {FLAGS.rounds} rounds, "
          f"variants {FLAGS.variants} alternating", flush=True)
    rows = [ab_row(name, int(batch)) for name in FLAGS.models for batch in FLAGS.batches]
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
