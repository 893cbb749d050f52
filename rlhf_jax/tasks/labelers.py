"""Simulated labelers: noisy rankings of K responses from their hidden gold scores.

A labeler ranks with a Plackett-Luce model whose utilities are gold / temperature
(Plackett 1975, Luce 1959), sampled exactly with the Gumbel-max trick: sort by
gold / T + Gumbel noise. Its pairwise marginals are Bradley-Terry:
P(i above j) = sigmoid((g_i - g_j) / T), so two labelers often disagree on close pairs, as
human labelers do (InstructGPT reports ~73% inter-labeler agreement).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.tasks.instructions import Example, gold_scores


def _check_temperature(temperature: float) -> None:
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"labeler temperature must be finite and >= 0, got {temperature}")


def rank_responses(gold: Sequence[float], rng: np.random.Generator,
                   temperature: float) -> np.ndarray:
    """One labeler's ranking of K responses: int array of indices, best first.

    temperature 0: sorted by gold score, ties broken by the lower index first.
    temperature > 0: a Plackett-Luce sample with utilities gold / temperature.
    """
    _check_temperature(temperature)
    gold = np.asarray(gold, np.float64)
    if gold.ndim != 1 or not np.all(np.isfinite(gold)):
        raise ValueError(f"rank_responses needs a finite 1-D score array, got {gold!r}")
    keys = gold if temperature == 0 else gold / temperature + rng.gumbel(size=gold.shape)
    return np.argsort(-keys, kind="stable")


def ranks_from_ranking(ranking: Sequence[int]) -> np.ndarray:
    """Invert a ranking (indices best first) into ranks per response (0 = best)."""
    ranking = np.asarray(ranking)
    if sorted(ranking.tolist()) != list(range(len(ranking))):
        raise ValueError(f"ranking must be a permutation of 0..K-1, got {ranking.tolist()}")
    ranks = np.empty(len(ranking), np.int32)
    ranks[ranking] = np.arange(len(ranking), dtype=np.int32)
    return ranks


def preference_probability(gold: Sequence[float], temperature: float) -> np.ndarray:
    """[K, K] matrix P[i, j] = P(labeler puts i above j) = sigmoid((g_i - g_j) / T).

    At T = 0 the labeler is deterministic: 1 if g_i > g_j, and for ties the lower index wins.
    """
    _check_temperature(temperature)
    gold = np.asarray(gold, np.float64)
    diff = gold[:, None] - gold[None, :]
    if temperature == 0:
        k = len(gold)
        lower_index = np.arange(k)[:, None] < np.arange(k)[None, :]
        return ((diff > 0) | ((diff == 0) & lower_index)).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-diff / temperature))


def _upper_pairs(gold_sets: Sequence[Sequence[float]], temperature: float) -> np.ndarray:
    """P(first above second) for every unordered pair i < j of every prompt, concatenated."""
    probs = []
    for gold in gold_sets:
        p = preference_probability(gold, temperature)
        probs.append(p[np.triu_indices(len(gold), k=1)])
    if not probs or sum(len(p) for p in probs) == 0:
        raise ValueError("need at least one prompt with >= 2 responses")
    return np.concatenate(probs)


def labeler_agreement(gold_sets: Sequence[Sequence[float]], temperature: float) -> float:
    """Expected fraction of response pairs on which two independent labelers agree.

    For a pair with p = P(i above j): p^2 + (1 - p)^2, averaged over all K(K-1)/2 pairs of
    every prompt. 1 at T = 0, -> 0.5 as T grows.
    """
    p = _upper_pairs(gold_sets, temperature)
    return float(np.mean(p**2 + (1 - p) ** 2))


def bayes_pair_accuracy(gold_sets: Sequence[Sequence[float]], temperature: float) -> float:
    """Best accuracy any reward model can reach against one labeler's pair labels.

    The Bayes-optimal model prefers the response with the higher gold score and is right
    with probability max(p, 1 - p) per pair; always >= `labeler_agreement`.
    """
    p = _upper_pairs(gold_sets, temperature)
    return float(np.mean(np.maximum(p, 1 - p)))


def collect_rankings(examples: Sequence[Example], responses: Sequence[Sequence[str]],
                     rng: np.random.Generator, temperature: float) -> list[dict]:
    """Rank the K responses of each prompt with a simulated labeler.

    Returns records {"prompt", "responses", "ranking" (indices best first)} for
    `write_rankings`; the gold scores themselves are not included.
    """
    if len(examples) != len(responses):
        raise ValueError(f"collect_rankings got {len(examples)} examples but "
                         f"{len(responses)} response lists")
    records = []
    for example, candidates in zip(examples, responses):
        candidates = list(candidates)
        if len(candidates) < 2:
            raise ValueError(f"prompt {example.id!r} has {len(candidates)} responses; "
                             "ranking needs K >= 2")
        scores = gold_scores([example] * len(candidates), candidates)
        ranking = rank_responses(scores, rng, temperature)
        records.append({"prompt": example.prompt, "responses": candidates,
                        "ranking": [int(i) for i in ranking]})
    return records
