"""Generation: exact logprobs, greedy = naive argmax loop, padding invariance, EOS masking, early stop,
no retracing, and the sampler's distribution (chi-square against the exact probabilities)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import generation
from rlhf_jax.generation import SamplingConfig, choose_tokens, generate, sample, sample_from_weights, two_level_argmax
from rlhf_jax.models import Transformer, TransformerConfig, init_params

VOCAB = 300  # not a multiple of the 128-token sampler block: the padded tail is exercised
CONFIG = TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def model_and_params():
    """N(0, 0.12²) weights (6x the usual init: peaked, input-dependent next-token distributions, a
    real test of greedy), norm scales 1; built from shapes only, so no init compile."""
    model = Transformer(CONFIG)
    rng = np.random.RandomState(0)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if path[-1].key == "scale" else jnp.asarray(0.12 * rng.randn(*s.shape),
                                                                                       jnp.float32), shapes)
    return model, params


@jax.jit
def _logits(params, ids, mask):
    """Plain full forward pass (no cache), compiled once per shape."""
    return Transformer(CONFIG).apply({"params": params}, ids, mask).logits


def _prompts():
    """3 left-padded prompts of lengths 7, 5, 2 (pad id 0)."""
    ids = np.random.RandomState(0).randint(1, VOCAB, (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _teacher_forced_logprobs(model, params, ids, mask, tokens, response_mask, temperature):
    """Independent reference: one full forward over prompt+response, NumPy log-softmax, gather."""
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, response_mask], 1)
    logits = np.asarray(_logits(params, full_ids, full_mask), np.float64) / temperature
    logits = logits[:, ids.shape[1] - 1:-1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0] * response_mask


def test_logprobs_equal_teacher_forced(model_and_params):
    """Sampled with temperature and top-k/top-p filtering, logprobs are still the tempered, unfiltered ones."""
    model, params = model_and_params
    ids, mask = _prompts()
    out = generate(model, params, ids, mask, jax.random.PRNGKey(1), max_new_tokens=10,
                   temperature=0.7, top_k=40, top_p=0.9)
    tokens, response_mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert response_mask.all()  # no eos_id: every position is a real token
    ref = _teacher_forced_logprobs(model, params, ids, mask, tokens, response_mask, 0.7)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-4)
    helper = generation.response_logprobs(model, params, jnp.asarray(ids), jnp.asarray(mask), out.tokens, out.mask,
                                          temperature=0.7)
    np.testing.assert_allclose(np.asarray(helper), ref, atol=1e-4)


def test_greedy_equals_naive_argmax_loop(model_and_params):
    """KV-cache greedy decoding = argmax of a full forward recomputed from scratch at every step.

    The naive loop keeps a fixed [3, 7+8] buffer (one compile): tokens not generated yet sit to the
    right with mask 0, which causal attention never sees anyway.
    """
    model, params = model_and_params
    ids, mask = _prompts()
    out = generate(model, params, ids, mask, jax.random.PRNGKey(2), max_new_tokens=8, temperature=0.0)
    seq = np.concatenate([ids, np.zeros((3, 8), np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((3, 8), np.int32)], 1)
    expected, expected_lp = [], []
    for step in range(8):
        last = ids.shape[1] + step - 1
        logits = np.asarray(_logits(params, seq, seq_mask))[:, last]
        nxt = logits.argmax(-1).astype(np.int32)
        shifted = logits - logits.max(-1, keepdims=True)
        expected_lp.append(shifted[np.arange(3), nxt] - np.log(np.exp(shifted).sum(-1)))  # untempered
        expected.append(nxt)
        seq[:, last + 1], seq_mask[:, last + 1] = nxt, 1
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(expected, 1))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.stack(expected_lp, 1), atol=1e-4)
    assert len(set(np.asarray(out.tokens).ravel().tolist())) > 3  # outputs depend on the input


def test_left_padding_does_not_change_greedy_output(model_and_params):
    """Rows 1 and 2 of the [3, 7] batch (2 and 5 pads) again in a [2, 5] batch (0 and 3 pads)."""
    model, params = model_and_params
    ids, mask = _prompts()
    batch = generate(model, params, ids, mask, jax.random.PRNGKey(3), max_new_tokens=6, temperature=0.0)
    again = generate(model, params, ids[1:, 2:], mask[1:, 2:], jax.random.PRNGKey(3), max_new_tokens=6,
                     temperature=0.0)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(batch.tokens)[1:])
    np.testing.assert_allclose(np.asarray(again.logprobs), np.asarray(batch.logprobs)[1:], atol=1e-5)


def test_nothing_after_eos_is_unmasked(model_and_params):
    """Row 0 stops at its first EOS (mask 1 up to and including it); other rows keep their tokens."""
    model, params = model_and_params
    ids, mask = _prompts()
    free = generate(model, params, ids, mask, jax.random.PRNGKey(4), max_new_tokens=8, temperature=0.0)
    free_tokens = np.asarray(free.tokens)
    eos = int(free_tokens[0, 2])
    first_eos = [int(np.argmax(r == eos)) if (r == eos).any() else None for r in free_tokens]
    out = generate(model, params, ids, mask, jax.random.PRNGKey(4), max_new_tokens=8, temperature=0.0,
                   eos_id=eos, pad_id=-1)
    tokens, logprobs, response_mask = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    for row, stop in enumerate(first_eos):
        n_real = 8 if stop is None else stop + 1
        np.testing.assert_array_equal(response_mask[row], np.arange(8) < n_real)
        np.testing.assert_array_equal(tokens[row, :n_real], free_tokens[row, :n_real])
        assert (tokens[row, n_real:] == -1).all() and (logprobs[row, n_real:] == 0).all()
    assert first_eos[0] <= 2 and response_mask[0].sum() <= 3


class CountingTransformer(Transformer):
    """Counts Python traces of the model and executed forward passes (debug callback)."""

    traces = 0
    executed = 0

    def __call__(self, *args, **kwargs):
        CountingTransformer.traces += 1
        jax.debug.callback(CountingTransformer._count_execution)
        return super().__call__(*args, **kwargs)

    @staticmethod
    def _count_execution():
        CountingTransformer.executed += 1


def _eos_forcing_params(params):
    """A zero lm_head: all logits tie, greedy takes the first index, so every row emits token 0 first."""
    return {**params, "lm_head": {"kernel": jnp.zeros_like(params["lm_head"]["kernel"])}}


def test_early_stop_and_no_retracing(model_and_params):
    _, params = model_and_params
    model = CountingTransformer(CONFIG)
    ids, mask = _prompts()
    # Every row's first token is EOS -> the decode loop must not run a single step (prefill only).
    forced = _eos_forcing_params(params)
    out = generate(model, forced, ids, mask, jax.random.PRNGKey(0), max_new_tokens=6, temperature=0.0, eos_id=0)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out.mask), [[1, 0, 0, 0, 0, 0]] * 3)
    assert CountingTransformer.executed == 1
    traces_after_first = CountingTransformer.traces
    assert traces_after_first == 2  # prefill + decode-loop body

    # Same shapes and settings, other params/rng values: compiled program is reused (no new traces),
    # and without early EOS all 6 tokens are decoded: prefill + 5 loop steps = 6 forward passes.
    CountingTransformer.executed = 0
    out = generate(model, params, ids, mask, jax.random.PRNGKey(1), max_new_tokens=6, temperature=0.0, eos_id=0)
    jax.effects_barrier()
    assert np.asarray(out.mask).all()
    assert CountingTransformer.traces == traces_after_first
    assert CountingTransformer.executed == 6


def test_sample_is_traceable_under_outer_jit(model_and_params):
    """PPO calls `sample` inside its own jit: same result as the public jit-cached `generate`."""
    model, params = model_and_params
    ids, mask = _prompts()
    config = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=40, top_p=0.9)  # as in the logprob test

    @jax.jit
    def rollout(params, ids, mask, rng):
        out = sample(model, params, ids, mask, rng, config)
        return out, out.logprobs.sum()

    inner, _ = rollout(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(5))
    outer = generate(model, params, ids, mask, jax.random.PRNGKey(5), max_new_tokens=10, temperature=0.7,
                     top_k=40, top_p=0.9)
    for a, b in zip((inner.tokens, inner.mask, inner.logprobs), (outer.tokens, outer.mask, outer.logprobs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_arguments_fail_loudly(model_and_params):
    model, params = model_and_params
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, params, ids, mask[:, ::-1], jax.random.PRNGKey(0), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p=1.5"):
        generate(model, params, ids, mask, jax.random.PRNGKey(0), max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        SamplingConfig(max_new_tokens=0)


# ----------------------------------------------------------------------------------------------
# Sampler distribution
# ----------------------------------------------------------------------------------------------
N_DRAWS = 40_000


def _chi_square_p_value(draws, probs):
    """Pearson chi-square goodness of fit over the categories with positive probability."""
    support = probs > 0
    observed = np.bincount(draws, minlength=len(probs))
    assert observed[~support].sum() == 0, "a zero-probability token was drawn"
    return stats.chisquare(observed[support], N_DRAWS * probs[support] / probs[support].sum()).pvalue


def test_two_level_draw_matches_the_distribution():
    """40k exact draws from 300 weights (zeros included, spread over 3 blocks, one block empty).

    Under the null the p-value is uniform on [0, 1]; with this fixed seed it must not fall below
    1e-3 (a biased sampler, e.g. an off-by-one in a block boundary, gives p ~ 0 at 40k draws).
    """
    rng = np.random.RandomState(7)
    weights = rng.gamma(0.5, size=VOCAB).astype(np.float32)
    weights[rng.rand(VOCAB) < 0.3] = 0.0
    weights[128:256] = 0.0  # a whole empty block
    weights[127] = weights[256] = 5.0  # heavy tokens at both sides of it
    draws = sample_from_weights(jnp.broadcast_to(jnp.asarray(weights), (N_DRAWS, VOCAB)), jax.random.PRNGKey(0))
    assert _chi_square_p_value(np.asarray(draws), weights.astype(np.float64)) > 1e-3
    draws_1d = np.asarray(draws)
    assert abs((draws_1d == 127).mean() - weights[127] / weights.sum()) < 0.01  # ~2.5 sigma at these counts


def test_choose_tokens_applies_temperature_top_k_and_top_p():
    """Filtered sampling draws from the renormalised top-k ∩ nucleus set; a NumPy loop builds that set."""
    rng = np.random.RandomState(3)
    logits = (2.0 * rng.randn(VOCAB)).astype(np.float32)
    temperature, top_k, top_p = 0.8, 50, 0.7
    probs = np.exp((logits - logits.max()) / temperature).astype(np.float64)
    probs /= probs.sum()
    order = np.argsort(-probs)[:top_k]  # top-k
    kept, mass = [], 0.0
    renorm = probs[order] / probs[order].sum()
    for token, p in zip(order, renorm):  # nucleus: keep while the mass before the token < top_p
        if mass >= top_p:
            break
        kept.append(token)
        mass += p
    expected = np.zeros(VOCAB)
    expected[kept] = probs[kept]
    config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, logprobs = choose_tokens(jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, VOCAB)),
                                     jax.random.PRNGKey(1), config)
    tokens = np.asarray(tokens)
    assert 3 < len(kept) < top_k
    assert _chi_square_p_value(tokens, expected) > 1e-3
    # logprobs: the tempered, unfiltered distribution
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[tokens]), atol=1e-5)


def test_two_level_argmax_matches_numpy_including_ties():
    x = np.random.RandomState(0).randn(4, VOCAB).astype(np.float32)
    x[1, [5, 200]] = 10.0  # tie across blocks: first index wins, as in np.argmax
    x[2, [130, 131]] = 10.0  # tie inside a block
    x[3, VOCAB - 1] = 10.0  # the max in the padded last block
    index, best = two_level_argmax(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(index), x.argmax(-1))
    np.testing.assert_array_equal(np.asarray(best), x.max(-1))


# ----------------------------------------------------------------------------------------------
# Decode-loop segments (the KV cache grows so attention reads about the live slots)
# ----------------------------------------------------------------------------------------------
def _mean_step_bytes(ends, param_bytes, kv_bytes_per_slot, prompt_len):
    """Loop over decode steps: step i (1..N-1) runs in the first segment whose end exceeds i, with a
    cache of prompt_len + end slots; the prefill's step 0 uses the first segment's cache."""
    total = 0
    for step in range(ends[-1]):
        end = next(e for e in ends if step < e)
        total += param_bytes + kv_bytes_per_slot * (prompt_len + end)
    return total / ends[-1]


@pytest.mark.parametrize("batch,n_new", [(1, 64), (16, 64), (64, 64), (64, 512)])
def test_segment_ends_split_only_when_it_saves_bytes(batch, n_new):
    """The GPT-2 size of the benchmarks: every kept split saves >= MIN_SAVING of the bytes a step
    reads (recounted step by step), and one more split would not (or is not allowed)."""
    cfg = TransformerConfig.gpt2(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_len=1024)
    model = Transformer(cfg)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    param_bytes = 4 * sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    kv_bytes_per_slot = 2 * 6 * batch * 4 * 64 * 4  # k and v, 6 layers, 4 heads of 64, fp32
    ends = generation.segment_ends(model, shapes, batch, 32, n_new)
    assert ends[-1] == n_new and list(ends) == sorted(set(ends)) and len(ends) <= generation.MAX_SEGMENTS
    cost = lambda e: _mean_step_bytes(e, param_bytes, kv_bytes_per_slot, 32)
    for i in range(1, len(ends)):
        assert cost(ends[i - 1:]) <= (1 - generation.MIN_SAVING) * cost(ends[i:])
    more = (ends[0] // 2,) + ends
    assert (len(ends) == generation.MAX_SEGMENTS or ends[0] < 2 * generation.MIN_SEGMENT
            or cost(more) > (1 - generation.MIN_SAVING) * cost(ends))
    if batch == 1:
        assert ends == (n_new,)  # the cache is small next to the parameters: one loop
    if batch == 64:
        assert len(ends) >= 2


def test_segmented_decoding_equals_one_loop(model_and_params, monkeypatch):
    """Forcing 3 segments (cache grown twice) gives the same tokens and log-probs as one loop."""
    model, params = model_and_params
    ids, mask = _prompts()
    run = lambda: jax.jit(sample, static_argnames=("model", "config"))(
        model, params, ids, mask, jax.random.PRNGKey(6), SamplingConfig(max_new_tokens=10, temperature=0.9))
    monkeypatch.setattr(generation, "MIN_SAVING", 1.0)  # never split
    assert generation.segment_ends(model, params, 3, 7, 10) == (10,)
    single = run()
    monkeypatch.setattr(generation, "MIN_SAVING", -1.0)  # always split
    monkeypatch.setattr(generation, "MIN_SEGMENT", 2)
    assert generation.segment_ends(model, params, 3, 7, 10) == (2, 5, 10)
    split = run()
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(split.logprobs), np.asarray(single.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(split.mask), np.asarray(single.mask))
