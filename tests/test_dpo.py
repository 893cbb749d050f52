"""DPO family: losses against hand-computed numbers, the ordered pairs of a ranking, sequence
log-probs against per-row NumPy teacher forcing, ranking batches' response masks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, preference, tasks
from rlhf_jax.pipeline import online_dpo
from rlhf_jax.models import Transformer, TransformerConfig, init_params

# log(1 + e^-x) = -log sigma(x), written out once so the tests below read as hand computations
SOFTPLUS_NEG_1 = 0.31326168751822286  # -log sigma(1)
SOFTPLUS_POS_1 = 1.3132616875182228  # -log sigma(-1)
SOFTPLUS_NEG_1_5 = 0.20141327798275246  # -log sigma(1.5)


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def test_softplus_constants():
    close(math.log1p(math.exp(-1.0)), SOFTPLUS_NEG_1, 1e-12)
    close(math.log1p(math.exp(1.0)), SOFTPLUS_POS_1, 1e-12)
    close(math.log1p(math.exp(-1.5)), SOFTPLUS_NEG_1_5, 1e-12)


# ------------------------------------------------------------------------------------------
# losses.dpo_loss: hand-computed numbers
# ------------------------------------------------------------------------------------------
# pair 0: policy moved toward chosen: pc - rc = +1, pr - rr = -1 -> h = 2
# pair 1: policy equals the reference -> h = 0 (a tie: accuracy 1/2)
PC, PR = jnp.array([-1.0, -5.0]), jnp.array([-3.0, -4.0])
RC, RR = jnp.array([-2.0, -5.0]), jnp.array([-2.0, -4.0])


def test_sigmoid_dpo_hand_computed():
    loss, aux = losses.dpo_loss(PC, PR, RC, RR, 0.5)
    # beta h = 1 -> -log sigma(1); h = 0 -> log 2
    close(loss, (SOFTPLUS_NEG_1 + math.log(2)) / 2)
    close(aux["rewards/chosen"], (0.5 * 1 + 0.0) / 2)
    close(aux["rewards/rejected"], (0.5 * -1 + 0.0) / 2)
    close(aux["rewards/margin"], (1.0 + 0.0) / 2)
    close(aux["rewards/accuracy"], (1.0 + 0.5) / 2)


def test_cdpo_label_smoothing_hand_computed():
    loss, _ = losses.dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], 0.5, label_smoothing=0.1)
    close(loss, 0.9 * SOFTPLUS_NEG_1 + 0.1 * SOFTPLUS_POS_1)  # = 0.41326...
    close(loss, 0.4132616875182229)
    # eps = 0.5: the loss is symmetric in the pair and pulls h back to 0: d/dpc = 0.5 beta (sigma(beta h) -
    # sigma(-beta h)) = 0.25 (0.7310586 - 0.2689414) at beta h = 1, and 0 at h = 0 (pair 1)
    grad = jax.grad(lambda pc: losses.dpo_loss(pc, PR, RC, RR, 0.5, label_smoothing=0.5)[0])(PC)
    close(grad, [0.25 * (0.7310585786 - 0.2689414214) / 2, 0.0])


def test_sigmoid_gradient_and_frozen_reference():
    # d/dpc of -log sigma(beta h) = -beta sigma(-beta h); beta h = 1 -> -0.5 * sigma(-1)
    grads = jax.grad(lambda pc, rc: losses.dpo_loss(pc, PR[:1], rc, RR[:1], 0.5)[0], argnums=(0, 1))(PC[:1], RC[:1])
    close(grads[0], [-0.5 / (1 + math.e)])
    close(grads[1], [0.0])  # the reference is a constant


def test_ipo_hand_computed():
    # beta 0.5: target 1/(2 beta) = 1; h = 2 -> (2 - 1)^2 = 1; h = 0 -> 1
    loss, aux = losses.dpo_loss(PC, PR, RC, RR, 0.5, loss_type="ipo")
    close(loss, 1.0)
    close(aux["rewards/margin"], 0.5)
    # beta 0.25: target 2 = h -> 0 on pair 0; pair 1 -> (0 - 2)^2 = 4
    loss, _ = losses.dpo_loss(PC, PR, RC, RR, 0.25, loss_type="ipo")
    close(loss, (0.0 + 4.0) / 2)


def test_simpo_hand_computed_length_normalised():
    # chosen -4 over 2 tokens, rejected -9 over 3: beta 2 -> rewards -4 and -6, margin 2; gamma 0.5
    pc, pr, lc, lr = jnp.array([-4.0]), jnp.array([-9.0]), jnp.array([2.0]), jnp.array([3.0])
    loss, aux = losses.dpo_loss(pc, pr, None, None, 2.0, loss_type="simpo", chosen_lengths=lc,
                                rejected_lengths=lr, gamma=0.5)
    close(loss, SOFTPLUS_NEG_1_5)  # -log sigma(2 - 0.5)
    close(aux["rewards/chosen"], -4.0)
    close(aux["rewards/rejected"], -6.0)
    close(aux["rewards/accuracy"], 1.0)
    # same sums, lengths swapped (3 and 2 tokens): rewards 2(-4/3) and 2(-9/2); any reference is ignored
    loss2, aux2 = losses.dpo_loss(pc, pr, jnp.array([99.0]), jnp.array([-99.0]), 2.0, loss_type="simpo",
                                  chosen_lengths=lr, rejected_lengths=lc, gamma=0.5)
    close(aux2["rewards/margin"], 2 * (-4 / 3) - 2 * (-9 / 2), 1e-5)
    close(loss2, math.log1p(math.exp(-(2 * (-4 / 3) - 2 * (-9 / 2) - 0.5))), 1e-5)  # reference ignored


def test_dpo_loss_errors():
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(PC, PR, RC, RR, 0.1, loss_type="hinge2")
    with pytest.raises(ValueError, match="lengths"):
        losses.dpo_loss(PC, PR, RC, RR, 0.1, loss_type="simpo")


# ------------------------------------------------------------------------------------------
# Pairs of a ranking
# ------------------------------------------------------------------------------------------
def test_k4_ranking_gives_exactly_its_six_ordered_pairs():
    ranks = jnp.array([[2, 0, 3, 1], [0, 1, -1, 1]])  # row 1: one absent response, a tie between 1 and 3
    chosen, rejected, valid = (np.asarray(x) for x in preference.ordered_pairs(ranks))
    assert chosen.shape == (2, 6)
    got = {(int(c), int(r)) for c, r, v in zip(chosen[0], rejected[0], valid[0]) if v}
    # better-ranked first: order of responses by rank is 1 (0), 3 (1), 0 (2), 2 (3)
    assert got == {(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)}
    got1 = {(int(c), int(r)) for c, r, v in zip(chosen[1], rejected[1], valid[1]) if v}
    assert got1 == {(0, 1), (0, 3)}  # 2 is absent, 1 and 3 are tied


# ------------------------------------------------------------------------------------------
# Sequence log-probs: response tokens only, any padding
# ------------------------------------------------------------------------------------------
VOCAB = 50
CONFIG = TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)


@pytest.fixture(scope="module")
def lm():
    model = Transformer(CONFIG)
    rng = np.random.RandomState(0)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if path[-1].key == "scale" else jnp.asarray(0.3 * rng.randn(*s.shape),
                                                                                      jnp.float32), shapes)
    return model, params


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_logp(model, params, prompt: list[int], response: list[int]) -> float:
    """Teacher forcing of one unpadded row, summed over the response tokens in float64 NumPy."""
    ids = jnp.asarray([prompt + response], jnp.int32)
    logits = model.apply({"params": params}, ids, jnp.ones_like(ids)).logits[0]
    logp = _np_log_softmax(logits)
    return float(sum(logp[len(prompt) + n - 1, tok] for n, tok in enumerate(response)))


ROWS = [([3, 4, 5], [6, 7, 8, 9]), ([10], [11]), ([12, 13, 14, 15, 16], [17, 18]), ([19, 20], [21, 22, 23, 24, 25])]


def test_sequence_logps_left_padded_prompts_ragged_responses(lm):
    model, params = lm
    p_len, n_len = 6, 6
    ids = np.zeros((len(ROWS), p_len + n_len), np.int32)
    mask, targets = np.zeros_like(ids), np.zeros_like(ids)
    for i, (prompt, response) in enumerate(ROWS):
        ids[i, p_len - len(prompt):p_len] = prompt
        ids[i, p_len:p_len + len(response)] = response
        ids[i, p_len + len(response):] = 49  # padding token that must not count
        mask[i, p_len - len(prompt):p_len + len(response)] = 1
        targets[i, p_len:p_len + len(response)] = 1
    logps, lengths = preference.sequence_logps(model, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(targets))
    expected = [reference_logp(model, params, p, r) for p, r in ROWS]
    close(logps, expected, 1e-4)
    close(lengths, [len(r) for _, r in ROWS])


def test_ranking_logps_right_padded_equal_per_row(lm):
    model, params = lm
    t = 12
    ids, mask, targets = (np.zeros((2, 2, t), np.int32) for _ in range(3))
    for n, (prompt, response) in enumerate(ROWS):
        seq = prompt + response
        p, k = divmod(n, 2)
        ids[p, k, :len(seq)], mask[p, k, :len(seq)] = seq, 1
        targets[p, k, len(prompt):len(seq)] = 1
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(targets)}
    logps, lengths = preference.ranking_logps(model, params, batch)
    expected = np.reshape([reference_logp(model, params, p, r) for p, r in ROWS], (2, 2))
    close(logps, expected, 1e-4)
    close(lengths, np.reshape([len(r) for _, r in ROWS], (2, 2)))


def test_ranking_pair_losses_ipo_uses_length_averages():
    logps = jnp.array([[-4.0, -9.0]])
    ref = jnp.array([[-6.0, -6.0]])
    lengths = jnp.array([[2.0, 3.0]])
    settings = {"loss_type": "ipo", "beta": 0.5, "label_smoothing": 0.0, "gamma": 0.0}
    pair_losses, aux, valid = preference.ranking_pair_losses(logps, ref, lengths, jnp.array([[0, 1]]), settings)
    h = (-4 / 2 - -6 / 2) - (-9 / 3 - -6 / 3)  # = 1 + 1 = 2
    close(pair_losses, [[(h - 1.0) ** 2]])
    close(aux["logps/chosen"], [[-2.0]])
    close(valid, [[1.0]])
    settings["loss_type"] = "sigmoid"  # summed log-probs
    pair_losses, _, _ = preference.ranking_pair_losses(logps, ref, lengths, jnp.array([[1, 0]]), settings)
    # ranks [1, 0]: response 1 is chosen -> h = (-9 + 6) - (-4 + 6) = -5, loss = -log sigma(0.5 * -5)
    close(pair_losses, [[math.log1p(math.exp(2.5))]], 1e-5)


# ------------------------------------------------------------------------------------------
# Online DPO: the prompts of a round, ranking its samples
# ------------------------------------------------------------------------------------------
def test_online_round_prompts_wrap_and_samples_are_ranked_by_the_rm_or_the_labeler():
    assert online_dpo.round_rows(0, 3, 5).tolist() == [0, 1, 2]
    assert online_dpo.round_rows(1, 3, 5).tolist() == [3, 4, 0]
    examples = tasks.sample_examples(2, seed=0)
    # row 0: first 3 distinct non-empty samples are x (0), y (1), z (4); row 1 has only 2 distinct: skipped
    texts = [["x", "y", "x", "", "z"], ["p", "p", "q", "p", "p"]]
    scores = np.array([[0.1, 0.9, 5.0, 7.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]])
    records = online_dpo.rank_round(examples, texts, scores, "rm", 3, None, 0.0)
    assert records == [{"prompt": examples[0].prompt, "responses": ["x", "y", "z"], "ranking": [1, 2, 0]}]
    # a noise-free labeler puts the gold answer first
    records = online_dpo.rank_round(examples[:1], [["not it at all", examples[0].answer]], None, "labeler", 2,
                                    np.random.default_rng(0), 0.0)
    assert records[0]["responses"] == ["not it at all", examples[0].answer] and records[0]["ranking"] == [1, 0]
