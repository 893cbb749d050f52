"""KV-cache sampling: one prefill of the left-padded prompt, then a jitted decode loop.

`sample(model, params, prompt_ids, prompt_mask, rng, config)` is pure and traceable (PPO calls it
inside its own jitted iteration); `generate(...)` is the public, jit-cached wrapper (compiles once
per shapes and `SamplingConfig`). `response_logprobs` is the teacher-forced counterpart that PPO
uses for the actor and the reference model.

Conventions
- Prompts `[B, P]` are LEFT-padded, so every row's last prompt token sits in slot P-1 and new
  tokens go to slots P, P+1, ... of the KV cache.
- The decode loop runs the model in the decode layout of `rlhf_jax.models.decode` (per-layer
  parameters and KV cache), computes logits only where a token is drawn, and, when the cache is
  large next to the parameters, runs in segments whose cache grows (`segment_ends`) so attention
  reads about the live slots, not all P + N (measurements: docs/benchmarks.md).
- `logprobs` are log-probs of the sampled tokens under the temperature-scaled, UNFILTERED softmax
  (the distribution PPO trains); top-k / top-p only shape the distribution we draw from.
  `temperature=0` is greedy decoding, its logprobs are under the untempered softmax.
- `eos_id` is the stop set: one id or several (Llama-3 chat models end a turn with `<|eot_id|>` or
  `<|end_of_text|>`); `stop_ids` normalises it. `mask` is 1 up to and including the first stop
  token, 0 after; tokens after it are `pad_id`, logprobs after it are 0. The loop stops as soon as
  every row has emitted a stop token.
- Sampler: an exact two-level inverse-CDF draw. Pick a block of 128 vocabulary entries with
  probability proportional to its mass, then a token inside the block proportionally to its
  weight. P(token) = (block mass / total) * (weight / block mass) = weight / total, with two
  uniforms per row instead of the V Gumbel draws of `jax.random.categorical`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses
from rlhf_jax.models import decode
from rlhf_jax.models.transformer import Transformer, default_position_ids

BLOCK = 128  # vocabulary block size of the two-level draw / argmax

StopIds = Union[int, Sequence[int], None]


def stop_ids(eos_id: StopIds) -> tuple[int, ...]:
    """The stop set as a sorted tuple of unique ids: None or a negative int (the configs' "none")
    -> (); an int -> (id,); a sequence of ints -> its ids. ValueError on anything else."""
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)) and not isinstance(eos_id, bool):
        return () if eos_id < 0 else (int(eos_id),)
    if isinstance(eos_id, (list, tuple)) and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                 and i >= 0 for i in eos_id):
        return tuple(sorted({int(i) for i in eos_id}))
    raise ValueError(f"eos_id={eos_id!r}: need a token id, a list of token ids, or None / -1 for no stop token")


def is_stop(tokens, stop: tuple[int, ...]):
    """`tokens [...]` -> bool array of the same shape: the token is in the stop set `stop`
    (a `stop_ids` tuple; all False when it is empty). numpy in, numpy out; jax in, jax out."""
    xp = np if isinstance(tokens, np.ndarray) else jnp
    if not stop:
        return xp.zeros(tokens.shape, bool)
    return xp.isin(tokens, xp.asarray(stop, dtype=tokens.dtype))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) sampling settings: one compiled program per distinct value."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off; else keep the k most likely tokens (ties at the k-th value kept)
    top_p: float = 1.0  # 1 = off; else keep the smallest most-likely set with mass >= top_p
    eos_id: StopIds = None  # the stop set (normalised to a `stop_ids` tuple); None / () = never stop early
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "eos_id", stop_ids(self.eos_id))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} (need an int >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature!r} (need >= 0; 0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} (need an int >= 0; 0 means off)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p!r} (need 0 < top_p <= 1; 1 means off)")
        if problems:
            raise ValueError("SamplingConfig: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@flax.struct.dataclass
class Generation:
    """`tokens [B, N]` int32, `logprobs [B, N]` fp32, `mask [B, N]` int32 (1 = real response token)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array


# ----------------------------------------------------------------------------------------------
# Sampler pieces: pure functions over [B, V] fp32
# ----------------------------------------------------------------------------------------------
def _blocks(x: jax.Array, fill) -> jax.Array:
    """`[B, V] -> [B, ceil(V/128), 128]`, padding the tail with `fill`."""
    batch, vocab = x.shape
    n_blocks = -(-vocab // BLOCK)
    x = jnp.pad(x, ((0, 0), (0, n_blocks * BLOCK - vocab)), constant_values=fill)
    return x.reshape(batch, n_blocks, BLOCK)


def _take_block(blocks: jax.Array, block_index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(blocks, block_index[:, None, None], axis=1)[:, 0]


def two_level_argmax(x: jax.Array) -> tuple:
    """`(argmax, max)` of `x [B, V]` over the last axis via block maxima (first index on ties,
    like `jnp.argmax`)."""
    blocks = _blocks(x, -jnp.inf)
    block_max = blocks.max(axis=-1)
    best = block_max.max(axis=-1)
    block = jnp.argmax(block_max, axis=-1)
    inside = jnp.argmax(_take_block(blocks, block), axis=-1)
    return (block * BLOCK + inside).astype(jnp.int32), best


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index `j` with cdf[j-1] <= u·total < cdf[j] for `weights [B, n] >= 0`, `u [B]` in [0, 1).

    A zero-weight slot is never returned (float rounding is clamped to the last positive slot).
    """
    cdf = jnp.cumsum(weights, axis=-1)
    target = u * cdf[:, -1]
    index = jnp.sum(cdf <= target[:, None], axis=-1)
    positions = jnp.arange(weights.shape[-1])
    last_positive = jnp.max(jnp.where(weights > 0, positions, 0), axis=-1)
    return jnp.minimum(index, last_positive)


def sample_from_weights(weights: jax.Array, rng: jax.Array) -> jax.Array:
    """One exact draw per row from unnormalised `weights [B, V] >= 0` (two-level inverse CDF)."""
    blocks = _blocks(weights, 0.0)
    u = jax.random.uniform(rng, (weights.shape[0], 2), jnp.float32)
    block = _inverse_cdf(blocks.sum(axis=-1), u[:, 0])
    inside = _inverse_cdf(_take_block(blocks, block), u[:, 1])
    return (block * BLOCK + inside).astype(jnp.int32)


def _filter_weights(weights: jax.Array, scaled_logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Zero the weights outside the top-k, then outside the top-p nucleus (HF's order).

    Nucleus: walk tokens from most to least likely and keep each one whose preceding mass is
    < top_p of the (top-k filtered) total; at least one token is always kept.
    """
    if top_k:
        kth = jax.lax.top_k(scaled_logits, top_k)[0][:, -1:]
        weights = jnp.where(scaled_logits >= kth, weights, 0.0)
    if top_p < 1.0:
        k = top_k or weights.shape[-1]
        ranked = jax.lax.top_k(weights, k)[0]  # descending
        mass_before = jnp.cumsum(ranked, axis=-1) - ranked
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p * ranked.sum(-1, keepdims=True), axis=-1), 1)
        smallest_kept = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)
        weights = jnp.where(weights >= smallest_kept, weights, 0.0)
    return weights


def choose_tokens(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> tuple:
    """Next token and its log-prob for `logits [B, V]` (fp32) -> `(tokens [B] int32, logprobs [B])`.

    log p = z[token] - logsumexp(z) with z = logits / temperature (z = logits when greedy).
    """
    logits = logits.astype(jnp.float32)
    scaled = logits if config.greedy else logits / config.temperature
    greedy_token, z_max = two_level_argmax(scaled)
    weights = jnp.exp(scaled - z_max[:, None])
    log_normalizer = z_max + jnp.log(weights.sum(axis=-1))
    if config.greedy:
        tokens = greedy_token
    else:
        tokens = sample_from_weights(_filter_weights(weights, scaled, config.top_k, config.top_p), rng)
    logprobs = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - log_normalizer
    return tokens, logprobs


# ----------------------------------------------------------------------------------------------
# Prefill + decode loop
# ----------------------------------------------------------------------------------------------
MIN_SEGMENT = 16  # decode steps: shortest decode-loop segment
MAX_SEGMENTS = 4  # each segment compiles its own copy of the loop body
MIN_SAVING = 0.10  # split a segment only if that cuts the bytes a decode step reads by this fraction


def segment_ends(model: Transformer, params, batch: int, prompt_len: int, n_new: int) -> tuple:
    """New-token counts at which the decode loop's KV cache grows; the last one is `n_new`.

    Attention reads every slot of the cache, live or not. Running the loop in segments whose
    cache holds `prompt_len + end` slots keeps those reads near the live context. The first
    segment is halved while that cuts the mean bytes per step (parameters + cache slots read) by
    >= MIN_SAVING: that pays off only where the cache is large next to the parameters (large
    batch, long responses); a small batch keeps one loop and one compiled body.
    """
    cfg = model.config
    kv_bytes_per_slot = 2 * cfg.n_layers * batch * cfg.kv_heads * cfg.dim_per_head * cfg.compute_dtype.itemsize
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))

    def bytes_per_step(ends):
        starts = (0,) + ends[:-1]
        return sum((end - start) * (param_bytes + kv_bytes_per_slot * (prompt_len + end))
                   for start, end in zip(starts, ends)) / n_new

    ends = (n_new,)
    while len(ends) < MAX_SEGMENTS and ends[0] >= 2 * MIN_SEGMENT:
        split = (ends[0] // 2,) + ends
        if bytes_per_step(split) > (1 - MIN_SAVING) * bytes_per_step(ends):
            break
        ends = split
    return ends


def _grow(cache: tuple, attention_mask: jax.Array, extra: int) -> tuple:
    """Append `extra` empty slots to every layer's cache and to the attention mask."""
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, extra), (0, 0)])
    cache = jax.tree_util.tree_map(pad, cache)
    return cache, jnp.pad(attention_mask, [(0, 0), (0, extra)])


def sample(model: Transformer, params, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           config: SamplingConfig) -> Generation:
    """Pure, traceable generation (use inside an outer `jax.jit`; `model` and `config` are static).

    Prefill writes the prompt into slots [0, P) of the cache; each decode step feeds the previous
    token at slot P+i-1 and draws token i. The decode `lax.while_loop`s (one per cache size, see
    `segment_ends`) end after N tokens or once every row has emitted a stop token; untouched positions
    keep pad_id / 0 / mask 0.
    """
    batch, prompt_len = prompt_ids.shape
    n_new = config.max_new_tokens
    params = decode.unstack_layers(params)  # the decode layout, once, outside the loop
    ends = segment_ends(model, params, batch, prompt_len, n_new)
    prompt_mask = prompt_mask.astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, ends[0]), jnp.int32)], axis=1)
    out = model.apply({"params": params}, prompt_ids.astype(jnp.int32), attention_mask,
                      default_position_ids(prompt_mask),
                      cache=decode.init_cache(model.config, batch, prompt_len + ends[0]), cache_index=0,
                      heads_from=-1)
    token, logprob = choose_tokens(out.logits[:, -1], jax.random.fold_in(rng, 0), config)
    first_position = prompt_mask.sum(axis=1)  # position id of the first new token (left padding skipped)

    tokens = jnp.full((batch, n_new), config.pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, n_new), jnp.float32).at[:, 0].set(logprob)
    response_mask = jnp.zeros((batch, n_new), jnp.int32).at[:, 0].set(1)
    done = is_stop(token, config.eos_id)

    def decode_step(state):
        step, prev_token, done, cache, attention_mask, tokens, logprobs, response_mask = state
        slot = prompt_len + step - 1  # where the previous token goes
        attention_mask = attention_mask.at[:, slot].set(1)
        positions = (first_position + step - 1)[:, None]
        out = model.apply({"params": params}, prev_token[:, None], attention_mask, positions, cache=cache,
                          cache_index=slot)
        token, logprob = choose_tokens(out.logits[:, 0], jax.random.fold_in(rng, step), config)
        alive = ~done
        token = jnp.where(alive, token, config.pad_id)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(alive, logprob, 0.0))
        response_mask = response_mask.at[:, step].set(alive.astype(jnp.int32))
        done = done | is_stop(token, config.eos_id)
        return step + 1, token, done, out.cache, attention_mask, tokens, logprobs, response_mask

    state = (jnp.int32(1), token, done, out.cache, attention_mask, tokens, logprobs, response_mask)
    for i, end in enumerate(ends):
        if i:
            step, token, done, cache, attention_mask, *rest = state
            state = (step, token, done, *_grow(cache, attention_mask, end - ends[i - 1]), *rest)
        keep_going = lambda state, end=end: (state[0] < end) & ~jnp.all(state[2])
        state = jax.lax.while_loop(keep_going, decode_step, state)
    *_, tokens, logprobs, response_mask = state
    return Generation(tokens=tokens, logprobs=logprobs, mask=response_mask)


_sample_jit = jax.jit(sample, static_argnames=("model", "config"))


def _check_prompts(model: Transformer, prompt_ids, prompt_mask, config: SamplingConfig) -> None:
    """Shape and padding checks on concrete inputs (skipped for tracers inside an outer jit)."""
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"generate: prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} "
                         "must both be [batch, prompt_len]")
    total = prompt_ids.shape[1] + config.max_new_tokens
    if model.config.positions == "learned" and total > model.config.max_len:
        raise ValueError(f"generate: prompt_len + max_new_tokens = {total} exceeds the model's "
                         f"max_len={model.config.max_len} (learned position table)")
    if not isinstance(prompt_mask, jax.core.Tracer):
        last_column = np.asarray(prompt_mask)[:, -1]
        if not np.all(last_column == 1):
            raise ValueError(f"generate: prompts must be LEFT-padded (prompt_mask[:, -1] == 1); rows "
                             f"{np.flatnonzero(last_column != 1)[:8].tolist()} end in padding")


def generate(model: Transformer, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: StopIds = None,
             pad_id: int = 0) -> Generation:
    """Sample `max_new_tokens` continuations of left-padded prompts `[B, P]` (jit-cached `sample`);
    `eos_id`: one stop id or a list of them (generation of a row ends at the first of any)."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p), eos_id=eos_id, pad_id=pad_id)
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    _check_prompts(model, prompt_ids, prompt_mask, config)
    return _sample_jit(model, params, prompt_ids, prompt_mask, rng, config)


# ----------------------------------------------------------------------------------------------
# Teacher forcing (PPO: actor and reference log-probs of the sampled responses)
# ----------------------------------------------------------------------------------------------
def response_logprobs(model: Transformer, params, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      response_ids: jax.Array, response_mask: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Teacher-forced log-probs `[B, N]` of `response_ids [B, N]` after left-padded prompts `[B, P]`.

    One forward pass over prompt+response; response token n is predicted from position P+n-1.
    Entries with `response_mask == 0` are 0. Equals `generate(...).logprobs` for the same tokens.
    """
    prompt_len = prompt_ids.shape[1]
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    logits = model.apply({"params": params}, input_ids, attention_mask, heads_from=prompt_len - 1).logits[:, :-1]
    scaled = logits.astype(jnp.float32) / (temperature or 1.0)  # temperature 0 (greedy): untempered, as generate
    return jnp.where(response_mask.astype(bool), losses.token_logprobs(scaled, response_ids), 0.0)
