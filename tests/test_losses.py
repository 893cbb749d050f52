"""rlhf_jax.losses: hand-computed examples, NumPy loop references on ragged batches, gradients, jit/vmap parity."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

B, T, V = 5, 6, 7
SEEDS = range(12)


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def ragged_mask(rng, batch=B, steps=T):
    """Prefix masks; row 0 has length 1 and row 1 full length, the rest random."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0], lengths[1] = 1, steps
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
