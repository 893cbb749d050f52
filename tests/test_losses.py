"""rlhf_jax.losses: hand-computed examples, NumPy loop references on ragged batches, gradients, jit/vmap parity."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.rl import kl_k3, masked_mean

B, T, V = 5, 6, 7
SEEDS = range(12)


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def ragged_mask(rng, batch=B, steps=T, allow_empty=False):
    """Prefix masks; row 0 has length 1 and row 1 full length, the rest random (row 2 empty if asked)."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0], lengths[1] = 1, steps
    if allow_empty:
        lengths[2] = 0
    return (np.arange(steps)[None, :] < lengths[:, None]).astype(np.int32)


def np_log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------
# Token log-probs and entropy
# ------------------------------------------------------------------------------------------


def test_token_logprobs_and_entropy_hand_example():
    logits = jnp.array([[[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]]])  # probs [1/2, 1/4, 1/4] and uniform
    close(losses.token_logprobs(logits, jnp.array([[0, 2]])), [[math.log(1 / 2), math.log(1 / 3)]])
    close(losses.token_logprobs(logits, jnp.array([[2, 1]])), [[math.log(1 / 4), math.log(1 / 3)]])
    # H = -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 0.5 log 2 + 0.5 log 4 = 1.5 log 2 ; uniform over 3: log 3
    close(losses.token_entropy(logits), [[1.5 * math.log(2), math.log(3)]])
    close(losses.entropy_from_logits(logits, jnp.array([[1, 1]])), (1.5 * math.log(2) + math.log(3)) / 2)
    close(losses.entropy_from_logits(logits, jnp.array([[0, 1]])), math.log(3))


@pytest.mark.parametrize("seed", SEEDS)
def test_token_logprobs_and_entropy_match_numpy(seed):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(B, T, V))).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    mask = ragged_mask(rng)
    log_probs = np_log_softmax(logits)
    expected = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    out = losses.token_logprobs(logits, tokens)
    assert out.dtype == jnp.float32
    close(out, expected)
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    close(losses.token_entropy(logits), entropy)
    close(losses.entropy_from_logits(logits, mask), entropy[mask.astype(bool)].mean())


def test_token_logprobs_are_fp32_for_bf16_logits():
    logits = jnp.array([[[4.0, 1.0, -2.0, 0.5]]], jnp.bfloat16)
    out = losses.token_logprobs(logits, jnp.array([[1]]))
    assert out.dtype == jnp.float32
    close(out, np_log_softmax(np.asarray(logits, np.float32))[..., 1], tol=1e-6)


# ------------------------------------------------------------------------------------------
# LM / SFT loss
# ------------------------------------------------------------------------------------------


def test_lm_loss_hand_example():
    input_ids = jnp.array([[2, 0, 1, 0]])
    loss_mask = jnp.array([[1, 1, 1, 0]])  # loss_mask[0] can never be a target and is ignored
    logits = jnp.array([[[math.log(2), 0, 0], [0, 0, 0], [5, 0, 0], [0, 9, 0]]], jnp.float32)
    # target t=1 (token 0) from logits[0] = probs [1/2,1/4,1/4]: nll log 2, argmax 0 -> hit
    # target t=2 (token 1) from logits[1] = uniform:             nll log 3, argmax 0 -> miss
    # t=3 has loss_mask 0 -> ignored; logits[3] predicts nothing
    loss, aux = losses.lm_loss(logits, input_ids, loss_mask)
    close(loss, (math.log(2) + math.log(3)) / 2)
    close(aux["tokens"], 2)
    close(aux["accuracy"], 0.5)
    loss_first_flipped, _ = losses.lm_loss(logits, input_ids, loss_mask.at[0, 0].set(0))
    close(loss_first_flipped, loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_lm_loss_matches_loop_and_gradient(seed):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(B, T, V))).astype(np.float32)
    input_ids = rng.integers(0, V, size=(B, T))
    # SFT-like mask: response tokens start after a random prompt and end at a random length
    starts, ends = rng.integers(0, T, size=B), rng.integers(1, T + 1, size=B)
    ends[0] = T  # one row trains to the end
    loss_mask = ((np.arange(T) >= starts[:, None]) & (np.arange(T) < ends[:, None])).astype(np.int32)
    loss_mask[1] = 1  # and one row is a full pretraining row
    log_probs = np_log_softmax(logits)
    nlls, hits = [], []
    for b, t in itertools.product(range(B), range(1, T)):
        if loss_mask[b, t]:
            nlls.append(-log_probs[b, t - 1, input_ids[b, t]])
            hits.append(np.argmax(logits[b, t - 1]) == input_ids[b, t])
    loss, aux = losses.lm_loss(logits, input_ids, loss_mask)
    close(loss, np.mean(nlls))
    close(aux["tokens"], len(nlls))
    close(aux["accuracy"], np.mean(hits))
    # d loss / d logits[b, t-1] = (softmax - onehot(x_t)) / N on targets, 0 elsewhere
    expected_grad = np.zeros_like(log_probs)
    for b, t in itertools.product(range(B), range(1, T)):
        if loss_mask[b, t]:
            expected_grad[b, t - 1] = (np.exp(log_probs[b, t - 1]) - np.eye(V)[input_ids[b, t]]) / len(nlls)
    grad = jax.grad(lambda z: losses.lm_loss(z, input_ids, loss_mask)[0])(logits)
    close(grad, expected_grad)


# ------------------------------------------------------------------------------------------
# Reward-model losses
# ------------------------------------------------------------------------------------------


def test_pairwise_ranking_loss_hand_example():
    # margins 0 and log 3: -log sigma(0) = log 2 ; sigma(log 3) = 3/4 -> -log(3/4) = log(4/3)
    chosen = jnp.array([1.0, math.log(3)])
    rejected = jnp.array([1.0, 0.0])
    close(losses.pairwise_ranking_loss(chosen, rejected), (math.log(2) + math.log(4 / 3)) / 2)


def test_ranking_loss_hand_example():
    scores = jnp.array([[0.0, math.log(3), 0.0], [5.0, 5.0, 5.0]])
    ranks = jnp.array([[0, 1, 2], [2, 0, 1]])
    # prompt 0 pairs (better, worse): (0,1): -log sigma(0 - log 3) = -log(1/4) = log 4
    #                                 (0,2): -log sigma(0)          = log 2
    #                                 (1,2): -log sigma(log 3)      = log(4/3)
    #   mean = (log 4 + log 2 + log 4/3) / 3 = log(32/3) / 3
    # prompt 1: equal scores -> every pair log 2
    expected = (math.log(32 / 3) / 3 + math.log(2)) / 2
    close(losses.ranking_loss(scores, ranks), expected)
    # accuracy: prompt 0: (0,1) wrong, (0,2) a score tie (1/2), (1,2) right -> 1.5/3 = 1/2;
    # prompt 1: every pair a score tie -> 1/2; mean 1/2
    close(losses.ranking_accuracy(scores, ranks), 0.5)
    close(losses.ranking_accuracy(jnp.array([[2.0, 1.0, 1.0]]), jnp.array([[0, 1, 2]])), (1 + 1 + 0.5) / 3)


def test_ranking_loss_with_k2_equals_pairwise():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=(2, 9)).astype(np.float32)
    swap = rng.integers(0, 2, size=9).astype(bool)  # chosen sits in column 0 or 1
    scores = np.where(swap[:, None], np.stack([rejected, chosen], 1), np.stack([chosen, rejected], 1))
    ranks = np.where(swap[:, None], [[1, 0]], [[0, 1]])
    close(losses.ranking_loss(scores, ranks), losses.pairwise_ranking_loss(chosen, rejected))
    close(losses.ranking_accuracy(scores, ranks), np.mean(chosen > rejected))


def ranking_reference(scores, ranks):
    per_prompt_loss, per_prompt_acc = [], []
    for s, r in zip(scores.astype(np.float64), ranks):
        pairs = [(i, j) for i in range(len(r)) for j in range(len(r)) if 0 <= r[i] < r[j]]
        if pairs:
            per_prompt_loss.append(np.mean([np.log1p(np.exp(-(s[i] - s[j]))) for i, j in pairs]))
            per_prompt_acc.append(np.mean([1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for i, j in pairs]))
    return np.mean(per_prompt_loss), np.mean(per_prompt_acc)


@pytest.mark.parametrize("seed", SEEDS)
def test_ranking_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    n_prompts, k = 6, 4
    scores = (2 * rng.normal(size=(n_prompts, k))).astype(np.float32)
    ranks = np.stack([rng.permutation(k) for _ in range(n_prompts)])
    ranks[1, rng.integers(0, k)] = -1  # an absent response
    ranks[2] = [0, 1, -1, -1]  # K = 2 within K = 4: one pair weighs as much as six
    ranks[3, :2] = 1  # a tie: no pair between them
    expected_loss, expected_acc = ranking_reference(scores, ranks)
    close(losses.ranking_loss(scores, ranks), expected_loss)
    close(losses.ranking_accuracy(scores, ranks), expected_acc)
    # permuting the K responses together with their ranks changes nothing
    perm = rng.permutation(k)
    close(losses.ranking_loss(scores[:, perm], ranks[:, perm]), expected_loss)


def test_ranking_loss_full_permutation_has_k_choose_2_pairs():
    """With distinct ranks, each prompt's term is the mean over exactly K(K-1)/2 pairs."""
    scores = jnp.array([[3.0, 2.0, 1.0, 0.0]])  # sorted best first, ranks 0..3
    ranks = jnp.array([[0, 1, 2, 3]])
    # margins: 1 (three pairs), 2 (two pairs), 3 (one pair) -> 6 = 4*3/2 pairs
    softplus = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigma(x)
    expected = (3 * softplus(1) + 2 * softplus(2) + softplus(3)) / 6
    close(losses.ranking_loss(scores, ranks), expected)
    close(losses.ranking_accuracy(scores, ranks), 1.0)


# ------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------


def test_ppo_policy_loss_hand_example():
    old = jnp.zeros((1, 5))
    logprobs = jnp.log(jnp.array([[1.5, 0.5, 0.5, 1.1, 9.0]]))  # ratios rho = exp(logp - 0)
    advantages = jnp.array([[1.0, 1.0, -2.0, 3.0, 100.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    # eps 0.2:  t0 rho 1.5 A 1:  max(-1.5, -1.2) = -1.2 (clipped)
    #           t1 rho 0.5 A 1:  max(-0.5, -0.8) = -0.5
    #           t2 rho 0.5 A -2: max(1.0, 1.6)   =  1.6 (clipped)
    #           t3 rho 1.1 A 3:  max(-3.3, -3.3) = -3.3 (inside the trust region)
    # loss = (-1.2 - 0.5 + 1.6 - 3.3) / 4 = -0.85 ; clipfrac 2/4
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, -0.85)
    close(aux["clipfrac"], 0.5)
    close(aux["ratio"], (1.5 + 0.5 + 0.5 + 1.1) / 4)
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    close(aux["approx_kl"], (k3(1.5) + 2 * k3(0.5) + k3(1.1)) / 4)
    # gradient wrt logp: -A * rho / N where unclipped, 0 where clipped or masked
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, advantages, mask, 0.2)[0])(logprobs)
    close(grad, [[0.0, -1.0 * 0.5 / 4, 0.0, -3.0 * 1.1 / 4, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_policy_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng)
    eps = 0.2
    terms, clipped, kls, ratios = [], [], [], []
    for b, t in itertools.product(range(B), range(T)):
        if mask[b, t]:
            rho = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            a = float(advantages[b, t])
            unclipped_term, clipped_term = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            terms.append(max(unclipped_term, clipped_term))
            clipped.append(clipped_term > unclipped_term)
            kls.append(rho - 1 - math.log(rho))
            ratios.append(rho)
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, eps)
    close(loss, np.mean(terms))
    close(aux["clipfrac"], np.mean(clipped))
    close(aux["approx_kl"], np.mean(kls))
    close(aux["ratio"], np.mean(ratios))


# ------------------------------------------------------------------------------------------
# Loss aggregation and the PPO family (clip-higher, dual-clip, penalty, GSPO)
# ------------------------------------------------------------------------------------------


def aggregate_reference(per_token, mask, mode):
    """Python loops over rows and tokens, verl's mode names."""
    rows = [[float(per_token[b, t]) for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]
    if mode == "token-mean":
        tokens = [x for row in rows for x in row]
        return sum(tokens) / max(len(tokens), 1)
    if mode == "seq-mean-token-mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / max(len(means), 1)
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in rows) / len(rows)
    return sum(sum(row) / mask.shape[1] for row in rows) / len(rows)


def test_aggregate_hand_example():
    per_token = jnp.array([[1.0, 2.0, 3.0, np.nan], [4.0, 9.0, 9.0, 9.0], [2.0, 6.0, 1e9, -1e9], [7.0] * 4])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # B = 4, T = 4
    # valid tokens: row 0 [1, 2, 3], row 1 [4], row 2 [2, 6], row 3 none
    close(losses.aggregate(per_token, mask), 18 / 6)  # token-mean: (6 + 4 + 8) / 6 tokens = 3
    close(losses.aggregate(per_token, mask, "seq-mean-token-mean"), (2 + 4 + 4) / 3)  # row means; empty row out
    close(losses.aggregate(per_token, mask, "seq-mean-token-sum"), (6 + 4 + 8 + 0) / 4)  # row sums over B = 4
    close(losses.aggregate(per_token, mask, "seq-mean-token-sum-norm"), (6 / 4 + 4 / 4 + 8 / 4 + 0) / 4)  # / T = 4
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-sum-norm"):
        losses.aggregate(per_token, mask, "seq-sum")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", losses.LOSS_AGG_MODES)
def test_aggregate_matches_loop(seed, mode):
    rng = np.random.default_rng(seed)
    per_token = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    out = losses.aggregate(np.where(mask, per_token, np.nan), mask, mode)  # padding may hold NaN
    assert out.dtype == jnp.float32
    close(out, aggregate_reference(per_token, mask, mode))


def ppo_policy_loss_seed_formula(logprobs, old_logprobs, advantages, mask, clip_eps):
    """ppo_policy_loss as it was before the algorithm-family keywords, copied op for op (bit-identity reference)."""
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    aux = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(kl_k3(old_logprobs, logprobs)), mask),
        "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, aux


@pytest.mark.parametrize("seed", range(6))
def test_ppo_policy_loss_default_is_bit_identical_to_seed_formula(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng)

    def equal(a, b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def check(new, old_fn):
        for wrap in (lambda f: f, jax.jit):
            new_loss, new_aux = wrap(new)(logprobs, old, advantages, mask)
            ref_loss, ref_aux = wrap(old_fn)(logprobs, old, advantages, mask)
            equal(new_loss, ref_loss)
            for key in ref_aux:
                equal(new_aux[key], ref_aux[key])
            grad = lambda f: jax.grad(lambda lp: f(lp, old, advantages, mask)[0])  # noqa: E731
            equal(wrap(grad(new))(logprobs), wrap(grad(old_fn))(logprobs))

    reference = lambda lp, o, a, m: ppo_policy_loss_seed_formula(lp, o, a, m, 0.2)  # noqa: E731
    check(lambda lp, o, a, m: losses.ppo_policy_loss(lp, o, a, m, 0.2), reference)
    # the defaults spelled out are the same function
    check(lambda lp, o, a, m: losses.ppo_policy_loss(lp, o, a, m, 0.2, clip_eps_high=None, dual_clip=None,
                                                     loss_agg_mode="token-mean"), reference)


def test_ppo_policy_loss_clip_higher_hand_example():
    old = jnp.zeros((1, 5))
    logprobs = jnp.log(jnp.array([[1.25, 1.5, 0.5, 1.1, 9.0]]))  # ratios rho = exp(logp - 0)
    advantages = jnp.array([[1.0, 1.0, -2.0, 3.0, 100.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    # eps 0.2, eps_high 0.28: range [0.8, 1.28]
    #   t0 rho 1.25 A 1:  inside -> -1.25          (symmetric PPO would clip at 1.2: -1.2)
    #   t1 rho 1.5  A 1:  max(-1.5, -1.28) = -1.28 clipped above
    #   t2 rho 0.5  A -2: max(1.0, 1.6)    =  1.6  clipped below
    #   t3 rho 1.1  A 3:  -3.3
    # loss = (-1.25 - 1.28 + 1.6 - 3.3) / 4 = -4.23 / 4 = -1.0575 ; clipfrac 2/4 = high 1/4 + low 1/4
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2, clip_eps_high=0.28)
    close(loss, -1.0575)
    close([aux["clipfrac"], aux["clipfrac_high"], aux["clipfrac_low"]], [0.5, 0.25, 0.25])
    assert "dual_clipfrac" not in aux
    # symmetric: t0 -> -1.2 clipped too: (-1.2 - 1.2 + 1.6 - 3.3) / 4 = -1.025 ; clipfrac 3/4 = 2/4 + 1/4
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, -1.025)
    close([aux["clipfrac"], aux["clipfrac_high"], aux["clipfrac_low"]], [0.75, 0.5, 0.25])
    # gradient with clip-higher: -A * rho / 4 where not clipped (t0, t3), 0 elsewhere
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, advantages, mask, 0.2, clip_eps_high=0.28)[0])(logprobs)
    close(grad, [[-1.25 / 4, 0.0, 0.0, -3.3 / 4, 0.0]])


def test_ppo_policy_loss_dual_clip_hand_example():
    old = jnp.zeros((1, 5))
    logprobs = jnp.log(jnp.array([[5.0, 2.0, 0.5, 5.0, 1.0]]))
    advantages = jnp.array([[-1.0, -1.0, -2.0, 1.0, -50.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    # eps 0.2, c = 3 (bound -c*A applies only where A < 0):
    #   t0 rho 5   A -1: max(5, 1.2) = 5   > 3 = -c*A -> 3   (dual bound active)
    #   t1 rho 2   A -1: max(2, 1.2) = 2   < 3        -> 2
    #   t2 rho 0.5 A -2: max(1, 1.6) = 1.6 < 6        -> 1.6 (ordinary clip below)
    #   t3 rho 5   A 1:  max(-5, -1.2) = -1.2 (clipped above; A > 0 has no dual bound)
    # loss = (3 + 2 + 1.6 - 1.2) / 4 = 1.35 ; without dual clip (5 + 2 + 1.6 - 1.2) / 4 = 1.85
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2, dual_clip=3.0)
    close(loss, 1.35)
    close(aux["dual_clipfrac"], 0.25)
    close([aux["clipfrac"], aux["clipfrac_high"], aux["clipfrac_low"]], [0.5, 0.25, 0.25])
    close(losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)[0], 1.85)
    # gradient: the constant bound (t0) and the clipped terms (t2, t3) give 0; t1: -A * rho / 4 = 0.5
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, advantages, mask, 0.2, dual_clip=3.0)[0])(logprobs)
    close(grad, [[0.0, 0.5, 0.0, 0.0, 0.0]])
    for bad in (1.0, 0.5, -3.0):
        with pytest.raises(ValueError, match="dual_clip"):
            losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2, dual_clip=bad)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        losses.ppo_policy_loss(logprobs, old, advantages, mask, 0.2, loss_agg_mode="sum")


@pytest.mark.parametrize("mode, expected, expected_grad", [
    # rho = 1 everywhere, so the token loss is -A and d loss / d logp = -A * (weight of the token)
    # A = [[1, 2, 3], [4, -, -]] (row 0 three tokens, row 1 one token), T = 3, B = 2
    ("token-mean", -(1 + 2 + 3 + 4) / 4, [[-1 / 4, -2 / 4, -3 / 4], [-4 / 4, 0, 0]]),
    ("seq-mean-token-mean", (-6 / 3 - 4 / 1) / 2, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 2, 0, 0]]),
    ("seq-mean-token-sum", (-6 - 4) / 2, [[-1 / 2, -2 / 2, -3 / 2], [-4 / 2, 0, 0]]),
    ("seq-mean-token-sum-norm", (-6 / 3 - 4 / 3) / 2, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 6, 0, 0]]),
])
def test_ppo_policy_loss_agg_modes_hand_example(mode, expected, expected_grad):
    old = jnp.zeros((2, 3))
    advantages = jnp.array([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    fn = lambda lp: losses.ppo_policy_loss(lp, old, advantages, mask, 0.2, loss_agg_mode=mode)  # noqa: E731
    loss, aux = fn(old)
    close(loss, expected)
    close(aux["clipfrac"], 0.0)
    close(jax.grad(lambda lp: fn(lp)[0])(old), expected_grad)


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_policy_loss_family_matches_loop(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.6 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    eps, eps_high = 0.2, [None, 0.28][seed % 2]
    dual_clip = [None, 1.5, 3.0][seed % 3]
    mode = losses.LOSS_AGG_MODES[seed % 4]
    high = eps if eps_high is None else eps_high
    terms = np.zeros((B, T))
    clipped_high, clipped_low, dual_hits, n_valid = 0, 0, 0, int(mask.sum())
    for b, t in itertools.product(range(B), range(T)):
        if mask[b, t]:
            rho = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            a = float(advantages[b, t])
            unclipped_term, clipped_term = -a * rho, -a * min(max(rho, 1 - eps), 1 + high)
            term = max(unclipped_term, clipped_term)
            clipped_high += clipped_term > unclipped_term and rho > 1 + high
            clipped_low += clipped_term > unclipped_term and rho < 1 - eps
            if dual_clip is not None and a < 0:
                dual_hits += term > -dual_clip * a
                term = min(term, -dual_clip * a)
            terms[b, t] = term
    loss, aux = losses.ppo_policy_loss(logprobs, old, advantages, mask, eps, clip_eps_high=eps_high,
                                       dual_clip=dual_clip, loss_agg_mode=mode)
    close(loss, aggregate_reference(terms, mask, mode))
    close(aux["clipfrac_high"], clipped_high / n_valid)
    close(aux["clipfrac_low"], clipped_low / n_valid)
    close(aux["clipfrac"], (clipped_high + clipped_low) / n_valid)
    if dual_clip is not None:
        close(aux["dual_clipfrac"], dual_hits / n_valid)


def test_ppo_penalty_loss_hand_example():
    old = jnp.zeros((1, 3))
    logprobs = jnp.log(jnp.array([[2.0, 0.5, 9.0]]))  # rho = 2, 0.5 (and a masked 9)
    advantages = jnp.array([[1.0, -1.0, 5.0]])
    mask = jnp.array([[1, 1, 0]])
    # surrogate: token-mean(-rho*A) = (-2 + 0.5) / 2 = -0.75
    # kl: token-mean(rho - 1 - log rho) = ((1 - log 2) + (-0.5 + log 2)) / 2 = 0.5 / 2 = 0.25
    # beta 0.1: loss = -0.75 + 0.1 * 0.25 = -0.725
    loss, aux = losses.ppo_penalty_loss(logprobs, old, advantages, mask, 0.1)
    close(loss, -0.725)
    close(aux["kl"], 0.25)
    close(aux["approx_kl"], 0.25)  # the clipped losses' name for the same k3 token-mean
    close(aux["surrogate"], -0.75)
    close(aux["ratio"], (2 + 0.5) / 2)
    # d/dlogp of -rho*A + beta*(rho - 1 - log rho) = -rho*A + beta*(rho - 1), over N = 2 tokens:
    #   t0: (-2 + 0.1 * 1) / 2 = -0.95 ; t1: (0.5 + 0.1 * -0.5) / 2 = 0.225 ; masked t2: 0
    grad = jax.grad(lambda lp: losses.ppo_penalty_loss(lp, old, advantages, mask, 0.1)[0])(logprobs)
    close(grad, [[-0.95, 0.225, 0.0]])


@pytest.mark.parametrize("seed", range(5))
def test_ppo_penalty_kl_direction_is_old_to_new(seed):
    """Averaged over every token weighted by pi_old, the penalty term is exactly KL(pi_old || pi)."""
    rng = np.random.default_rng(seed)
    p_old, p_new = rng.dirichlet(np.ones(V), size=2)
    logp_old = jnp.log(jnp.asarray(p_old, jnp.float32))[None]
    logp_new = jnp.log(jnp.asarray(p_new, jnp.float32))[None]
    per_token = (np.exp(logp_new - logp_old) - 1 - (logp_new - logp_old))[0]
    close(np.sum(p_old * per_token), np.sum(p_old * np.log(p_old / p_new)), tol=1e-5)
    # and the loss's aux["kl"] is the token-mean of exactly that per-token term
    _, aux = losses.ppo_penalty_loss(logp_new, logp_old, jnp.zeros((1, V)), jnp.ones((1, V)), 1.0)
    close(aux["kl"], per_token.mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_penalty_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.4 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    beta = float(rng.uniform(0.01, 1.0))
    surrogate, kl = [], []
    for b, t in itertools.product(range(B), range(T)):
        if mask[b, t]:
            rho = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            surrogate.append(-rho * float(advantages[b, t]))
            kl.append(rho - 1 - math.log(rho))
    loss, aux = losses.ppo_penalty_loss(logprobs, old, advantages, mask, beta)
    close(loss, np.mean(surrogate) + beta * np.mean(kl))
    close(aux["kl"], np.mean(kl))
    # beta = 0 is the unclipped policy-gradient surrogate: PPO with a clip range too wide to bind
    close(losses.ppo_penalty_loss(logprobs, old, advantages, mask, 0.0)[0],
          losses.ppo_policy_loss(logprobs, old, advantages, mask, 1e6)[0])


def test_gspo_policy_loss_hand_example():
    old = jnp.zeros((4, 3))
    logprobs = jnp.array([[0.1, 0.3, 5.0], [-0.5, 5.0, 5.0], [0.0, -0.1, 0.1], [5.0, 5.0, 5.0]])
    advantages = jnp.array([[1.0, 9.0, 9.0], [-2.0, 9.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    # s = exp(mean log ratio over the row's valid tokens), A = advantage at the first valid token:
    #   row 0: s = exp((0.1 + 0.3) / 2) = exp(0.2) = 1.221403 (not exp(0.4): length-normalised), A = 1
    #          eps 0.2: max(-1.221403, -1.2) = -1.2 (clipped)
    #   row 1: s = exp(-0.5) = 0.606531, A = -2: max(1.213061, 1.6) = 1.6 (clipped)
    #   row 2: s = exp(0) = 1, A = 3: -3
    #   row 3: no valid token -> left out
    # loss = (-1.2 + 1.6 - 3) / 3 = -0.866667 ; clipfrac 2/3
    loss, aux = losses.gspo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, -2.6 / 3)
    close(aux["clipfrac"], 2 / 3)
    close(aux["ratio"], (math.exp(0.2) + math.exp(-0.5) + 1.0) / 3)
    # clip-higher eps_high 0.3: row 0 is inside [0.8, 1.3]: (-1.221403 + 1.6 - 3) / 3
    loss_high, aux_high = losses.gspo_policy_loss(logprobs, old, advantages, mask, 0.2, clip_eps_high=0.3)
    close(loss_high, (-math.exp(0.2) + 1.6 - 3) / 3)
    close(aux_high["clipfrac"], 1 / 3)
    # gradient: rows 0 and 1 clipped -> 0; row 2: d(-A*s)/dlogp_t = -A * s / |y| / 3 rows = -3 * 1 / 3 / 3
    grad = jax.grad(lambda lp: losses.gspo_policy_loss(lp, old, advantages, mask, 0.2)[0])(logprobs)
    close(grad, [[0, 0, 0], [0, 0, 0], [-1 / 3] * 3, [0, 0, 0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_policy_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask(rng, allow_empty=True)
    eps, eps_high = 0.1, [None, 0.15][seed % 2]
    high = eps if eps_high is None else eps_high
    terms, clipped, kls = [], [], []
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        if not valid:
            continue
        s = math.exp(sum(float(logprobs[b, t]) - float(old[b, t]) for t in valid) / len(valid))
        a = float(advantages[b, valid[0]])
        unclipped_term, clipped_term = -a * s, -a * min(max(s, 1 - eps), 1 + high)
        terms.append(max(unclipped_term, clipped_term))
        clipped.append(clipped_term > unclipped_term)
        kls += [math.expm1(float(logprobs[b, t] - old[b, t])) - float(logprobs[b, t] - old[b, t]) for t in valid]
    loss, aux = losses.gspo_policy_loss(logprobs, old, advantages, mask, eps, clip_eps_high=eps_high)
    close(loss, np.mean(terms))
    close(aux["clipfrac"], np.mean(clipped))
    close(aux["approx_kl"], np.mean(kls))


def test_gspo_with_one_token_rows_is_ppo():
    """Every row one token long: s = rho and the row mean is the token mean, so GSPO = PPO (and its gradient)."""
    rng = np.random.default_rng(2)
    old = -rng.exponential(size=(B, T)).astype(np.float32)
    logprobs = (old + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.int32)
    mask[:, 0] = 1
    gspo = lambda lp: losses.gspo_policy_loss(lp, old, advantages, mask, 0.2, clip_eps_high=0.3)  # noqa: E731
    ppo = lambda lp: losses.ppo_policy_loss(lp, old, advantages, mask, 0.2, clip_eps_high=0.3)  # noqa: E731
    close(gspo(logprobs)[0], ppo(logprobs)[0])
    close(gspo(logprobs)[1]["clipfrac"], ppo(logprobs)[1]["clipfrac"])
    close(jax.grad(lambda lp: gspo(lp)[0])(logprobs), jax.grad(lambda lp: ppo(lp)[0])(logprobs))


def test_ppo_value_loss_hand_example():
    values = jnp.array([[1.0, 1.0, 0.1, 8.0]])
    old_values = jnp.array([[0.5, 0.5, 0.0, 0.0]])
    returns = jnp.array([[2.0, 0.0, 5.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    # eps 0.2: t0 (1-2)^2 = 1 vs clipped v = 0.5+0.2 = 0.7: (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    #          t1 (1-0)^2 = 1 vs (0.7-0)^2 = 0.49                          -> 1
    #          t2 v inside old±eps: (0.1-5)^2 = 24.01 both                -> 24.01
    # loss = 0.5 * (1.69 + 1 + 24.01) / 3 = 0.5 * 8.9 = 4.45 ; clipfrac 1/3
    loss, aux = losses.ppo_value_loss(values, old_values, returns, mask, 0.2)
    close(loss, 4.45)
    close(aux["clipfrac"], 1 / 3)
    # gradient: t0 clipped -> 0 ; t1: 0.5 * 2 (v - R) / 3 = 1/3 ; t2: (0.1 - 5)/3
    grad = jax.grad(lambda v: losses.ppo_value_loss(v, old_values, returns, mask, 0.2)[0])(values)
    close(grad, [[0.0, 1 / 3, (0.1 - 5) / 3, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_value_loss_matches_loop(seed):
    rng = np.random.default_rng(seed)
    old_values, returns = rng.normal(size=(2, B, T)).astype(np.float32)
    values = (old_values + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
    mask = ragged_mask(rng)
    eps = 0.2
    terms, clipped = [], []
    for b, t in itertools.product(range(B), range(T)):
        if mask[b, t]:
            v, v_old, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clipped = v_old + min(max(v - v_old, -eps), eps)
            terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
            clipped.append((v_clipped - r) ** 2 > (v - r) ** 2)
    loss, aux = losses.ppo_value_loss(values, old_values, returns, mask, eps)
    close(loss, np.mean(terms))
    close(aux["clipfrac"], np.mean(clipped))


def test_ppo_ptx_combination():
    # InstructGPT PPO-ptx: L = L_actor + gamma_ptx * L_LM ; -0.85 + 27.8 * 0.25 = 6.1
    close(losses.ppo_ptx_loss(jnp.float32(-0.85), jnp.float32(0.25), 27.8), 6.1)
    # with real pieces: equals the sum of the two losses, and so do the gradients
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(2, 4))
    mask = np.ones((2, 4), np.int32)
    old = np.asarray(losses.token_logprobs(logits, ids)) - 0.1
    adv = rng.normal(size=(2, 4)).astype(np.float32)

    def actor(z):
        return losses.ppo_policy_loss(losses.token_logprobs(z, ids), old, adv, mask, 0.2)[0]

    def lm(z):
        return losses.lm_loss(z, ids, mask)[0]

    combined = jax.grad(lambda z: losses.ppo_ptx_loss(actor(z), lm(z), 0.5))(logits)
    close(combined, jax.grad(actor)(logits) + 0.5 * jax.grad(lm)(logits))


# ------------------------------------------------------------------------------------------
# jit / vmap parity
# ------------------------------------------------------------------------------------------


def _loss_cases(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = ragged_mask(rng)
    lp, old, adv, v, v_old, ret = rng.normal(size=(6, B, T)).astype(np.float32)
    scores = rng.normal(size=(B, 3)).astype(np.float32)
    ranks = np.stack([rng.permutation(3) for _ in range(B)]).astype(np.int32)
    return {
        "token_logprobs": (losses.token_logprobs, (logits, ids)),
        "entropy": (losses.entropy_from_logits, (logits, mask)),
        "lm_loss": (losses.lm_loss, (logits, ids, mask)),
        "pairwise": (losses.pairwise_ranking_loss, (scores[:, 0], scores[:, 1])),
        "ranking": (losses.ranking_loss, (scores, ranks)),
        "ranking_accuracy": (losses.ranking_accuracy, (scores, ranks)),
        "policy": (lambda a, b, c, m: losses.ppo_policy_loss(a, b, c, m, 0.2), (lp, old, adv, mask)),
        "value": (lambda a, b, c, m: losses.ppo_value_loss(a, b, c, m, 0.2), (v, v_old, ret, mask)),
        "policy_family": (lambda a, b, c, m: losses.ppo_policy_loss(
            a, b, c, m, 0.2, clip_eps_high=0.28, dual_clip=3.0, loss_agg_mode="seq-mean-token-mean"),
            (lp, old, adv, mask)),
        "aggregate_token_sum": (lambda x, m: losses.aggregate(x, m, "seq-mean-token-sum"), (lp, mask)),
        "aggregate_sum_norm": (lambda x, m: losses.aggregate(x, m, "seq-mean-token-sum-norm"), (lp, mask)),
        "penalty": (lambda a, b, c, m: losses.ppo_penalty_loss(a, b, c, m, 0.1), (lp, old, adv, mask)),
        "gspo": (lambda a, b, c, m: losses.gspo_policy_loss(a, b, c, m, 0.2, clip_eps_high=0.3), (lp, old, adv, mask)),
        "ptx": (lambda a, b: losses.ppo_ptx_loss(a, b, 0.3), (lp[0, 0], old[0, 0])),
    }


@pytest.mark.parametrize("name", list(_loss_cases(np.random.default_rng(0))))
def test_jit_and_vmap_agree_with_eager(name):
    cases = [_loss_cases(np.random.default_rng(seed))[name] for seed in range(3)]
    fn = cases[0][0]
    eager = [fn(*args) for _, args in cases]
    jitted = jax.jit(fn)
    for (_, args), expected in zip(cases, eager):
        jax.tree.map(lambda a, b: close(a, b, tol=1e-6), jitted(*args), expected)
    stacked_args = [np.stack(parts) for parts in zip(*[args for _, args in cases])]
    batched = jax.jit(jax.vmap(fn))(*stacked_args)
    expected_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *eager)
    jax.tree.map(lambda a, b: close(a, b, tol=1e-6), batched, expected_stacked)
