"""Generation benchmark: our jitted KV-cache `generate` vs transformers' PyTorch `generate`.

Both run the IDENTICAL model (ours exported with `rlhf_jax.models.save_pretrained`, loaded with
`transformers.AutoModelForCausalLM`), with the KV cache on, plain sampling at temperature 1
(no top-k / top-p) and EOS stopping disabled, so both produce exactly N new tokens per row.
Each (model, batch, N) setting runs ours and the reference back to back in this process.

Per-decode-step roofline (issue 8): in the same process we measure the fp32 matmul peak (large
`jnp.dot`) and the read bandwidth for the step's working-set size (parameters + KV cache); a
step cannot be faster than max(FLOPs / peak, bytes / bandwidth). The measured step is the
marginal cost of one more token: (T(N_long) - T(N_short)) / (N_long - N_short).
The same rows also give the step's XLA kernel floor (`kernel_floor_seconds`): a loop of only the
step's matrix products as XLA:CPU runs them, i.e. what the step's arithmetic and reads cost before
any code around them (a measurement with the same noise as the step, not a proven bound).

    python experiments/bench_generation.py                       # full tables (minutes)
    python experiments/bench_generation.py --models tiny --batches 1 --new_tokens 8,16 --repeats 1
    python experiments/bench_generation.py --json /tmp/gen.json  # also write the rows as JSON
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import generation  # noqa: E402
from rlhf_jax.models import Transformer, TransformerConfig, init_params, save_pretrained  # noqa: E402
from rlhf_jax.models.decode import unstack_layers  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of this script (defined only when it runs, so other benchmarks can import its helpers)."""
    flags.DEFINE_list("models", ["tiny", "small"], "Model presets (see MODELS).")
    flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes.")
    flags.DEFINE_list("new_tokens", ["32", "64", "128"], "New-token counts; the smallest and largest give the "
                      "marginal per-step time for the roofline.")
    flags.DEFINE_integer("prompt_len", 32, "Prompt length (all rows full, no padding).")
    flags.DEFINE_integer("repeats", 3, "Timed runs per setting (best reported).")
    flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads; 0 = os.cpu_count().")
    flags.DEFINE_bool("reference", True, "Also run transformers' generate.")
    flags.DEFINE_string("json", "", "Write the result rows to this JSON file.")


# The 6-layer GPT-2 model, and a ~23M-parameter one of the same family.
MODELS = {
    "tiny": TransformerConfig.gpt2(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_len=1024),
    "small": TransformerConfig.gpt2(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_len=1024),
}


# ----------------------------------------------------------------------------------------------
# Timing and the machine's measured limits (shared by the other bench_*.py scripts)
# ----------------------------------------------------------------------------------------------
def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest wall time of `fn()` (result blocked on) over `repeats` runs after `warmup` runs.

    Best-of-n rather than the median: on a shared machine other processes only ever add time.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Best-of-n seconds of several callables timed in turn (a, b, a, b, ...), so a burst of load
    from other processes hits all of them rather than one."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of one large square `jnp.dot` (2·n³ FLOPs) in `dtype`: the compute ceiling."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
    b = jnp.asarray(np.random.RandomState(1).randn(n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    seconds = best_seconds(lambda: dot(a, b), repeats)
    return 2.0 * n ** 3 / seconds


def read_bandwidth(n_bytes: int, min_seconds: float = 0.2) -> float:
    """Measured bytes/s for reading an fp32 array of `n_bytes` once (a jitted `sum`), repeated
    in a `fori_loop` so the array stays as hot in cache as a decode step's working set would."""
    n = max(n_bytes // 4, 1024)
    x = jnp.asarray(np.random.RandomState(0).rand(n), jnp.float32)
    reps = max(1, int(2e8 // n))  # ~0.8 GB per call: long enough to time, short enough to repeat

    @jax.jit
    def stream(x):
        # The carried offset makes every pass depend on the previous one (no hoisting or fusion).
        return jax.lax.fori_loop(0, reps, lambda i, acc: acc + jnp.sum(x + acc * 1e-30), jnp.float32(0))

    seconds = best_seconds(lambda: stream(x), repeats=max(3, int(min_seconds / 0.05)))
    return reps * n * 4 / seconds


# ----------------------------------------------------------------------------------------------
# Model sizes, FLOPs and bytes of one decode step
# ----------------------------------------------------------------------------------------------
def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def decode_step_cost(config: TransformerConfig, params, batch: int, context: int) -> dict:
    """FLOPs and bytes of one decode step with `context` keys in the cache (fp32 everywhere).

    FLOPs: 2 per multiply-add of every weight matrix applied to `batch` tokens (layers + LM head;
    embedding lookups are free) + attention 2·2·batch·layers·context·(heads·head_dim) (scores
    and the weighted sum). Bytes that must be read: every parameter once + the K and V caches of
    `context` slots.
    """
    total = n_params(params)
    lookup_only = config.vocab_size * config.d_model * (0 if config.tie_embeddings else 1)  # untied: embed is a lookup
    lookup_only += config.max_len * config.d_model if config.positions == "learned" else 0
    vectors = 0  # norm scales and biases (elementwise, no matmul)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if leaf.ndim <= 2 and path[-1].key in ("scale", "bias"):
            vectors += int(np.prod(leaf.shape))
    matmul_weights = total - lookup_only - vectors
    width = config.n_heads * config.dim_per_head
    kv_width = config.kv_heads * config.dim_per_head
    flops = 2 * batch * matmul_weights + 4 * batch * config.n_layers * context * width
    kv_bytes = 2 * config.n_layers * batch * context * kv_width * 4
    return {"flops": flops, "param_bytes": 4 * total, "kv_bytes": kv_bytes, "bytes": 4 * total + kv_bytes}


def kernel_floor_seconds(config: TransformerConfig, params, batch: int, context: int, steps: int = 32) -> float:
    """Seconds per decode step of a `fori_loop` running only the step's matrix products (every
    layer's q/k/v/o and MLP kernels, the scores and weighted sum against K and V caches of
    `context` slots, in the einsum forms `decode.CachedAttention` uses, and the LM head) on the
    model's own weights, chained by adds. No norms, softmax, sampling or cache writes: what XLA's kernels
    need for the step's arithmetic and reads alone.
    """
    layers = unstack_layers(params)["layers"]
    h, kvh, d = config.n_heads, config.kv_heads, config.dim_per_head
    caches = [jnp.full((batch, kvh, context, d), 1e-3, jnp.float32) for _ in range(2 * len(layers))]
    head = params["embed"]["embedding"] if config.tie_embeddings else params["lm_head"]["kernel"]

    def step(x, weights):
        layers, caches, head = weights
        for i, layer in enumerate(layers):
            attn, mlp = layer["attn"], layer["mlp"]
            q = (x @ attn["q"]["kernel"]).reshape(batch, 1, kvh, h // kvh, d)
            k, v = x @ attn["k"]["kernel"], x @ attn["v"]["kernel"]
            scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, caches[2 * i])
            mixed = jnp.einsum("bhkd,bhgqk->bqhgd", caches[2 * i + 1], scores).reshape(batch, h * d)
            x = x + (mixed + jnp.tile(k + v, h // kvh)) @ attn["o"]["kernel"]
            hidden = x @ mlp["up"]["kernel"]
            if "gate" in mlp:
                hidden = hidden + x @ mlp["gate"]["kernel"]
            x = x + hidden @ mlp["down"]["kernel"]
        logits = x @ (head.T if config.tie_embeddings else head)  # transposed in the loop, as in LMHead
        return x + 1e-6 * logits[:, :config.d_model]

    loop = jax.jit(lambda x, weights: jax.lax.fori_loop(0, steps, lambda i, x: step(x, weights), x))
    x = jnp.full((batch, config.d_model), 1e-3, jnp.float32)
    return best_seconds(lambda: loop(x, (layers, caches, head)), repeats=5) / steps


# ----------------------------------------------------------------------------------------------
# The two implementations
# ----------------------------------------------------------------------------------------------
def prompts(vocab: int, batch: int, length: int, seed: int = 0):
    ids = np.random.RandomState(seed).randint(1, vocab, (batch, length)).astype(np.int32)
    return ids, np.ones_like(ids)


def ours_runner(model, params, ids, mask, n_new: int) -> Callable[[], object]:
    rng = jax.random.PRNGKey(0)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    return lambda: generation.generate(model, params, ids, mask, rng, max_new_tokens=n_new, temperature=1.0,
                                       eos_id=None).tokens


def load_reference(export_dir: str):
    """transformers' model from our export, in eval mode, EOS disabled in its generation config."""
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    ref.generation_config.bos_token_id = None
    return ref


def reference_runner(ref, ids, mask, n_new: int) -> Callable[[], object]:
    import torch

    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run():
        with torch.inference_mode():
            out = ref.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True)
        assert out.shape[1] == ids.shape[1] + n_new, out.shape
        return out

    return run


def check_identical(model, params, ref, vocab: int) -> float:
    """Max |logit difference| between our forward pass and transformers' on one prompt batch."""
    import torch

    ids, mask = prompts(vocab, 2, 16, seed=1)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    with torch.inference_mode():
        theirs = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    return float(np.max(np.abs(ours - theirs)))


# ----------------------------------------------------------------------------------------------
# One model: every (batch, N) setting, ours and the reference back to back
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    params_m: float
    batch: int
    new_tokens: int
    ours_tok_s: float
    ours_ms_per_step: float
    ours_compile_s: float
    ref_tok_s: float = math.nan
    ref_ms_per_step: float = math.nan
    ratio: float = math.nan


def bench_model(name: str, repeats: int, batches, new_tokens, prompt_len: int, reference: bool):
    config = MODELS[name]
    model = Transformer(config)
    params = init_params(model, jax.random.PRNGKey(0))
    size_m = n_params(params) / 1e6
    ref = None
    if reference:
        with tempfile.TemporaryDirectory() as export_dir:
            save_pretrained(model, params, export_dir,
                            extra_config={"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0})
            ref = load_reference(export_dir)
        print(f"[{name}] {size_m:.1f}M params; max |logits ours - transformers| = "
              f"{check_identical(model, params, ref, config.vocab_size):.2e}", flush=True)
    rows = []
    for batch in batches:
        ids, mask = prompts(config.vocab_size, batch, prompt_len)
        for n_new in new_tokens:
            run = ours_runner(model, params, ids, mask, n_new)
            start = time.perf_counter()
            jax.block_until_ready(run())
            first = time.perf_counter() - start
            runners = {"ours": run}
            if ref is not None:
                runners["ref"] = reference_runner(ref, ids, mask, n_new)
            best = interleaved_best(runners, repeats, warmup=0 if ref is None else 1)
            ours = best["ours"]
            row = Row(name, size_m, batch, n_new, batch * n_new / ours, 1e3 * ours / n_new, max(first - ours, 0.0))
            if ref is not None:
                theirs = best["ref"]
                row.ref_tok_s, row.ref_ms_per_step = batch * n_new / theirs, 1e3 * theirs / n_new
                row.ratio = row.ours_tok_s / row.ref_tok_s
            print(f"[{name}] B={batch:3d} N={n_new:4d}  ours {row.ours_tok_s:9.0f} tok/s ({row.ours_ms_per_step:7.2f} "
                  f"ms/step, compile {row.ours_compile_s:5.1f} s)  transformers {row.ref_tok_s:9.0f} tok/s "
                  f"({row.ref_ms_per_step:7.2f} ms/step)  ratio {row.ratio:5.2f}x", flush=True)
            rows.append(row)
    return model, params, rows


def roofline_rows(name, model, params, rows, prompt_len: int, peak: float) -> list:
    """Per batch: marginal decode-step time between the shortest and longest N vs the roofline at
    the mean context of those extra steps."""
    out = []
    for batch in sorted({r.batch for r in rows}):
        mine = sorted((r for r in rows if r.batch == batch), key=lambda r: r.new_tokens)
        short, long = mine[0], mine[-1]
        if long.new_tokens == short.new_tokens:
            continue
        seconds = (long.ours_ms_per_step * long.new_tokens - short.ours_ms_per_step * short.new_tokens) / 1e3
        step = seconds / (long.new_tokens - short.new_tokens)
        context = prompt_len + (short.new_tokens + long.new_tokens) // 2
        cost = decode_step_cost(model.config, params, batch, context)
        bandwidth = read_bandwidth(cost["bytes"])
        compute_s, memory_s = cost["flops"] / peak, cost["bytes"] / bandwidth
        roof = max(compute_s, memory_s)
        floor = kernel_floor_seconds(model.config, params, batch, context)
        out.append(dict(model=name, batch=batch, context=context, step_ms=1e3 * step, gflop=cost["flops"] / 1e9,
                        mbytes=cost["bytes"] / 1e6, bandwidth_gb_s=bandwidth / 1e9, compute_ms=1e3 * compute_s,
                        memory_ms=1e3 * memory_s, roofline_ms=1e3 * roof, x_roofline=step / roof,
                        kernel_floor_ms=1e3 * floor, floor_x_roofline=floor / roof, x_floor=step / floor))
        r = out[-1]
        print(f"[{name}] roofline B={batch:3d} ctx={context}: step {r['step_ms']:.2f} ms vs roofline "
              f"{r['roofline_ms']:.2f} ms (compute {r['compute_ms']:.2f} ms = {r['gflop']:.3f} GFLOP; memory "
              f"{r['memory_ms']:.2f} ms = {r['mbytes']:.1f} MB at {r['bandwidth_gb_s']:.1f} GB/s) -> "
              f"{r['x_roofline']:.2f}x; XLA kernel floor {r['kernel_floor_ms']:.2f} ms "
              f"({r['floor_x_roofline']:.2f}x roofline; step = {r['x_floor']:.2f}x floor)", flush=True)
    return out


def machine_info() -> dict:
    import platform

    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for module in ("flax", "optax", "numpy", "torch", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "load_avg": os.getloadavg(), "versions": versions}


def main(argv):
    del argv
    if FLAGS.reference:
        import torch

        torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
    batches = [int(b) for b in FLAGS.batches]
    new_tokens = [int(n) for n in FLAGS.new_tokens]
    info = machine_info()
    print(json.dumps(info), flush=True)
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"machine": info, "matmul_peak_gflop_s": peak / 1e9, "rows": [], "roofline": []}
    for name in FLAGS.models:
        if name not in MODELS:
            raise app.UsageError(f"--models: unknown preset {name!r} (known: {sorted(MODELS)})")
        model, params, rows = bench_model(name, FLAGS.repeats, batches, new_tokens, FLAGS.prompt_len,
                                          FLAGS.reference)
        results["rows"] += [dataclasses.asdict(r) for r in rows]
        results["roofline"] += roofline_rows(name, model, params, rows, FLAGS.prompt_len, peak)
    results["load_avg_end"] = os.getloadavg()
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
