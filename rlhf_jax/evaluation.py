"""Evaluation helpers for the pipeline: sample, decode, score with the RM and the gold judge, KL.

Everything here works on whole prompt sets with ONE fixed batch shape (rows are padded up to
`batch_size` by repeating row 0 and dropping the copies afterwards), so each model compiles its
sampler and its scoring pass once per run.

Conventions (shared with the trainers):
- prompts are LEFT-padded `[B, P]`; responses are `generate` outputs `[B, N]` whose mask is 1 up
  to and including the first EOS;
- the RM score of a response is the scalar head at the last real token of prompt + response,
  normalised with the RM's stored `reward_norm` (`rlhf_jax.models.reward.score`);
- the formulas live in one place each: the sequence KL of a response is `rl.kl_k1` summed over
  its valid tokens, the RM's pairwise accuracy is `losses.ranking_accuracy` (a score tie counts
  one half); this module only batches, samples, decodes and scores.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import generation, loading
from rlhf_jax.models import Transformer
from rlhf_jax.models import reward as reward_lib


# ----------------------------------------------------------------------------------------------
# Fixed-shape batching over a whole prompt set
# ----------------------------------------------------------------------------------------------
def padded_chunks(num_rows: int, batch_size: int) -> list[np.ndarray]:
    """Row indices `0..num_rows-1` cut into chunks of exactly `batch_size`; the last chunk is
    filled with row 0 (callers keep only the first `num_rows` results)."""
    if num_rows < 1 or batch_size < 1:
        raise ValueError(f"padded_chunks needs num_rows >= 1 and batch_size >= 1, got {num_rows}, {batch_size}")
    rows = np.arange(num_rows)
    rows = np.concatenate([rows, np.zeros(-num_rows % batch_size, np.int64)])
    return list(rows.reshape(-1, batch_size))


def map_batched(fn: Callable[..., dict], arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Apply `fn(**batch) -> {name: [b, ...]}` over fixed-size chunks of `arrays` (all [R, ...]);
    returns the concatenated numpy results for the R real rows."""
    num_rows = len(next(iter(arrays.values())))
    outputs: dict[str, list] = {}
    for chunk in padded_chunks(num_rows, batch_size):
        result = fn(**{name: value[chunk] for name, value in arrays.items()})
        for name, value in result.items():
            outputs.setdefault(name, []).append(np.asarray(jax.device_get(value)))
    return {name: np.concatenate(parts)[:num_rows] for name, parts in outputs.items()}


# ----------------------------------------------------------------------------------------------
# Sampling and decoding
# ----------------------------------------------------------------------------------------------
def sample_responses(model: Transformer, params, prompt_ids: np.ndarray, prompt_mask: np.ndarray, rng: jax.Array,
                     *, num_samples: int, batch_size: int, max_new_tokens: int, temperature: float,
                     eos_id: generation.StopIds, pad_id: int) -> dict[str, np.ndarray]:
    """`num_samples` responses per prompt -> {"tokens", "logprobs", "mask"} of shape [R, S, N].

    Prompt r's sample s is row r*S + s of one flat list of repeated prompts, sampled in chunks of
    `batch_size`; chunk c uses rng fold_in(rng, c), so results depend only on (rng, batch_size).
    """
    flat_ids = np.repeat(np.asarray(prompt_ids), num_samples, axis=0)
    flat_mask = np.repeat(np.asarray(prompt_mask), num_samples, axis=0)
    counter = iter(range(1 << 30))

    def sample_chunk(prompt_ids, prompt_mask):
        out = generation.generate(model, params, prompt_ids, prompt_mask, jax.random.fold_in(rng, next(counter)),
                                  max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                                  pad_id=pad_id)
        return {"tokens": out.tokens, "logprobs": out.logprobs, "mask": out.mask}

    flat = map_batched(sample_chunk, {"prompt_ids": flat_ids, "prompt_mask": flat_mask}, batch_size)
    num_prompts = len(prompt_ids)
    return {name: value.reshape(num_prompts, num_samples, *value.shape[1:]) for name, value in flat.items()}


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray, eos_id: generation.StopIds) -> list[str]:
    """Text of each response row `tokens [B, N]` / `mask [B, N]`: its valid tokens before the
    first stop token (`eos_id`: one id or a set, see `generation.stop_ids`), joined by the tokenizer.

    Special tokens other than the stop tokens are kept (a stray `<user>` is part of what the judge sees).
    """
    stop = generation.stop_ids(eos_id)
    texts = []
    for row_tokens, row_mask in zip(np.asarray(tokens), np.asarray(mask)):
        ids = np.asarray([int(t) for t, m in zip(row_tokens, row_mask) if m], np.int64)
        stops = np.flatnonzero(generation.is_stop(ids, stop))
        if len(stops):
            ids = ids[: stops[0]]
        texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False).strip())
    return texts


# ----------------------------------------------------------------------------------------------
# Scores of prompt + response sequences
# ----------------------------------------------------------------------------------------------
def _joined(prompt_ids, prompt_mask, response_ids, response_mask):
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return input_ids, attention_mask


def make_score_fn(model: Transformer, norm: Mapping[str, float] | None = None) -> Callable:
    """Jitted `score(params, prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`: the
    reward model's normalised score (`rlhf_jax.models.reward.score`, norm {"mean", "std"}) of the
    left-padded prompt followed by the response, read at its last real token."""
    if "value" not in model.heads:
        raise ValueError(f"scoring needs a model with a 'value' head, got heads={model.heads}")
    norm = dict(norm or loading.IDENTITY_NORM)

    @jax.jit
    def score(params, prompt_ids, prompt_mask, response_ids, response_mask):
        input_ids, attention_mask = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
        return reward_lib.score(model, params, norm, input_ids, attention_mask)

    return score


def make_logprob_fn(model: Transformer, temperature: float = 1.0) -> Callable:
    """Jitted teacher-forced `logprobs(params, prompt_ids, prompt_mask, response_ids, response_mask)
    -> [B, N]` (0 where the response mask is 0), under the temperature-scaled policy."""
    @jax.jit
    def logprobs(params, prompt_ids, prompt_mask, response_ids, response_mask):
        return generation.response_logprobs(model, params, prompt_ids, prompt_mask, response_ids, response_mask,
                                            temperature=temperature)

    return logprobs


def score_responses(score_fn: Callable, params, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                    tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """RM scores `[R, S]` of responses `[R, S, N]` to prompts `[R, P]` (S samples per prompt)."""
    num_prompts, num_samples = tokens.shape[:2]
    arrays = {"prompt_ids": np.repeat(prompt_ids, num_samples, axis=0),
              "prompt_mask": np.repeat(prompt_mask, num_samples, axis=0),
              "response_ids": tokens.reshape(num_prompts * num_samples, -1),
              "response_mask": mask.reshape(num_prompts * num_samples, -1)}
    out = map_batched(lambda **b: {"score": score_fn(params, **b)}, arrays, batch_size)
    return out["score"].reshape(num_prompts, num_samples)


def teacher_forced_logprobs(logprob_fn: Callable, params, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                            tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """Log-probs `[R, S, N]` of responses `[R, S, N]` under `params` (see `make_logprob_fn`)."""
    num_prompts, num_samples = tokens.shape[:2]
    arrays = {"prompt_ids": np.repeat(prompt_ids, num_samples, axis=0),
              "prompt_mask": np.repeat(prompt_mask, num_samples, axis=0),
              "response_ids": tokens.reshape(num_prompts * num_samples, -1),
              "response_mask": mask.reshape(num_prompts * num_samples, -1)}
    out = map_batched(lambda **b: {"logprobs": logprob_fn(params, **b)}, arrays, batch_size)
    return out["logprobs"].reshape(tokens.shape)


# ----------------------------------------------------------------------------------------------
# Picking responses (numpy): best of n, distinct candidates
# ----------------------------------------------------------------------------------------------
def best_of_n_indices(scores: np.ndarray) -> np.ndarray:
    """Index of the highest-scoring sample per prompt, `scores [R, S] -> [R]` (first on ties)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"best_of_n_indices needs scores [prompts, samples], got shape {scores.shape}")
    return np.argmax(scores, axis=1)


def distinct_first(candidates: Sequence[str], k: int) -> list[int] | None:
    """Indices of the first `k` pairwise-distinct strings in `candidates`, or None if fewer exist.

    Ranking data needs K different responses: identical ones carry no preference (and the data
    loader drops such rows).
    """
    seen: dict[str, int] = {}
    for index, text in enumerate(candidates):
        if text not in seen:
            seen[text] = index
            if len(seen) == k:
                return list(seen.values())
    return None
