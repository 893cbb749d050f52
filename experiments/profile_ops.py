"""Where a compiled step spends its time: per-op times from a `jax.profiler` trace, summed by the
source operation (the HLO `op_name`) that each compiled op came from.

How the numbers in docs/benchmarks.md ("What changed in this round") were found. The trace's
events are named after the compiled program's instructions (`ynn_fusion.3`, `dot.561`, ...); the
compiled HLO text maps each to the JAX operation that produced it (`.../mlp/up/dot_general`).
Events without an `op_name` (fusions XLA built on its own: copies, transposes, reductions split
in two) are listed by their instruction kind, prefixed with `?`.

    python experiments/profile_ops.py --step generate --model tiny --batch 16 --new_tokens 64
    python experiments/profile_ops.py --step sft      # bench_mfu.py's model and batch flags apply
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench helpers

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_mfu  # noqa: E402  (defines --d_model, --n_layers, --batch, --seq_len, ... for --step sft)
from bench_generation import MODELS, prompts  # noqa: E402
from rlhf_jax import generation  # noqa: E402
from rlhf_jax.models import Transformer, init_params  # noqa: E402
from rlhf_jax import optim  # noqa: E402
from rlhf_jax.trainers import state as train_state  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("step", "generate", ["generate", "sft"],
                  "What to profile: one `generate` call or one SFT train step.")
flags.DEFINE_enum("model", "tiny", sorted(MODELS), "Model preset for --step generate (bench_generation.MODELS).")
flags.DEFINE_integer("new_tokens", 64, "New tokens per row for --step generate (the batch is --batch).")
flags.DEFINE_integer("prompt_len", 32, "Prompt length for --step generate.")
flags.DEFINE_integer("runs", 3, "Profiled calls (after one warm-up call); times are per call.")
flags.DEFINE_integer("top", 30, "Rows to print.")

SKIP = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "ParseArguments", "DevicePut")


def generate_call():
    """(compiled program, call running it once) for one `generate` of --batch rows."""
    model = Transformer(MODELS[FLAGS.model])
    params = init_params(model, jax.random.PRNGKey(0))
    ids, mask = prompts(model.config.vocab_size, FLAGS.batch, FLAGS.prompt_len)
    rng = jax.random.PRNGKey(1)
    config = generation.SamplingConfig(max_new_tokens=FLAGS.new_tokens)
    compiled = jax.jit(generation.sample, static_argnames=("model", "config")).lower(
        model, params, ids, mask, rng, config).compile()
    return compiled, lambda: compiled(params, ids, mask, rng)


def sft_call():
    """(compiled program, call running it once) for bench_mfu.py's SFT train step (state donated)."""
    model = Transformer(bench_mfu.model_config())
    optimizer, schedule = optim.make_optimizer(bench_mfu.OPTIM, 1000)
    step = jax.jit(train_state.make_train_step(bench_mfu.sft_loss_fn(model), optimizer, schedule), donate_argnums=(0,))
    state = [jax.jit(lambda r: train_state.TrainState.create(init_params(model, r), optimizer, r))(jax.random.PRNGKey(0))]
    batch = {k: jnp.asarray(v) for k, v in bench_mfu.make_batches(
        "sft", FLAGS.batch, FLAGS.seq_len, FLAGS.vocab, FLAGS.seq_len // 4).items()}
    compiled = step.lower(state[0], batch).compile()

    def run():
        state[0], metrics = compiled(state[0], batch)
        return metrics

    return compiled, run


def op_names(hlo_text: str) -> dict:
    """Instruction name -> the `op_name` of its metadata, from compiled HLO text."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text, re.M):
        names.setdefault(match.group(1), match.group(2))
    return names


def source_of(event_name: str, names: dict) -> str:
    """A readable, layer-independent label: the op_name without the jit/while prefixes."""
    if event_name not in names:
        return "?" + re.sub(r"\.\d+$", "", event_name)
    label = re.sub(r"^jit\([^)]*\)/", "", names[event_name])
    label = label.replace("while/body/", "").replace("Transformer._unrolled_layers/", "")
    return re.sub(r"(Block|layers)_\d+", r"\1", label)


def profile(run, runs: int) -> list:
    """Trace events `(name, microseconds)` of `runs` calls of `run`."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(run())
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return [(e["name"], e["dur"]) for e in events
            if e.get("ph") == "X" and not e["name"].startswith(SKIP) and not e["name"].startswith("end: ")]


def main(argv):
    del argv
    compiled, run = generate_call() if FLAGS.step == "generate" else sft_call()
    jax.block_until_ready(run())  # warm-up
    names = op_names(compiled.as_text())
    total = collections.defaultdict(float)
    count = collections.Counter()
    for name, micros in profile(run, FLAGS.runs):
        label = source_of(name, names)
        total[label] += micros / FLAGS.runs
        count[label] += 1 / FLAGS.runs
    overall = sum(total.values())
    print(f"{FLAGS.step}: {overall / 1e3:.2f} ms of ops per call (traced; tracing adds overhead), "
          f"{sum(count.values()):.0f} ops per call")
    for label, micros in sorted(total.items(), key=lambda kv: -kv[1])[:FLAGS.top]:
        print(f"{micros / 1e3:9.3f} ms {100 * micros / overall:5.1f}% {count[label]:7.1f}x  {label}")


if __name__ == "__main__":
    app.run(main)
