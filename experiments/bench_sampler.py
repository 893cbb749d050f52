"""Sampler microbenchmark: the per-token draw on its own, on `[batch, vocab]` fp32 logits.

On a small model the draw costs about as much as a transformer layer (issue 8), so we time each
primitive a sampler could be built from and the library's pieces (`rlhf_jax.generation`):
`jax.random.categorical` (Gumbel-max: V random draws), `jnp.argmax`, `cumsum`, `softmax`, the
library's block argmax and exact two-level inverse-CDF draw (pick a block of 128 by its mass,
then a token inside it), and the whole `choose_tokens` (draw + log-prob) sampled and greedy.
Each is jitted and timed per call (best of several batches of calls, dispatch included).

    python experiments/bench_sampler.py                         # 16 x 8192, as in the issue
    python experiments/bench_sampler.py --batch 64 --vocab 50304 --json /tmp/sampler.json
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import generation  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 16, "Rows of logits.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
flags.DEFINE_integer("calls", 200, "Calls per timed batch.")
flags.DEFINE_integer("repeats", 5, "Timed batches (best reported).")
flags.DEFINE_string("json", "", "Write the results to this JSON file.")


def candidates() -> dict:
    """name -> jitted `f(logits, rng)`; each returns one small array per row."""
    sampled = generation.SamplingConfig(max_new_tokens=1, temperature=1.0)
    greedy = generation.SamplingConfig(max_new_tokens=1, temperature=0.0)
    fns = {
        "jax.random.categorical": lambda z, r: jax.random.categorical(r, z, axis=-1),
        "jnp.argmax": lambda z, r: jnp.argmax(z, axis=-1),
        "jnp.cumsum (last column)": lambda z, r: jnp.cumsum(z, axis=-1)[:, -1],
        "jax.nn.softmax (row max)": lambda z, r: jax.nn.softmax(z, axis=-1).max(-1),
        "exp + sum (normaliser)": lambda z, r: jnp.exp(z - z.max(-1, keepdims=True)).sum(-1),
        "generation.two_level_argmax": lambda z, r: generation.two_level_argmax(z)[0],
        "generation.sample_from_weights (two-level draw)":
            lambda z, r: generation.sample_from_weights(jnp.exp(z - z.max(-1, keepdims=True)), r),
        "generation.choose_tokens (T=1, token + logprob)": lambda z, r: generation.choose_tokens(z, r, sampled),
        "generation.choose_tokens (greedy)": lambda z, r: generation.choose_tokens(z, r, greedy),
    }
    return {name: jax.jit(fn) for name, fn in fns.items()}


def per_call_seconds(fn, logits, rng, calls: int, repeats: int) -> float:
    """Best over `repeats` of (time for `calls` back-to-back calls) / calls."""
    keys = jax.random.split(rng, calls)
    jax.block_until_ready(fn(logits, keys[0]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(logits, key) for key in keys]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv):
    del argv
    logits = jnp.asarray(3.0 * np.random.RandomState(0).randn(FLAGS.batch, FLAGS.vocab), jnp.float32)
    rng = jax.random.PRNGKey(0)
    print(f"{FLAGS.batch} x {FLAGS.vocab} fp32 logits, {jax.default_backend()}, load {os.getloadavg()}", flush=True)
    results = {"batch": FLAGS.batch, "vocab": FLAGS.vocab, "load_avg": os.getloadavg(), "ms_per_call": {}}
    for name, fn in candidates().items():
        ms = 1e3 * per_call_seconds(fn, logits, rng, FLAGS.calls, FLAGS.repeats)
        results["ms_per_call"][name] = ms
        print(f"{name:50s} {ms:7.3f} ms/call", flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
