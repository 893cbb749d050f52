"""Verifiable answers in GSM8K's format: the final answer after "####", exact-match grading, the
format check, and the unbiased pass@k estimator.

GSM8K (Cobbe et al. 2021) solutions end with a line "#### <answer>"; graders compare that final
answer with the gold after normalising it (surrounding spaces, thousands commas, a leading "$", a
trailing "."; numbers compare by value, so "72.0" matches "72"). The two reward functions follow
the host reward signature `reward(prompts, responses, **fields) -> list[float]`
(`rlhf_jax.host_rewards`) and can be named in a config as
`rlhf_jax.tasks.answers:exact_match` / `rlhf_jax.tasks.answers:answer_format`.
"""
from __future__ import annotations

import decimal
import re
from typing import Optional, Sequence

import numpy as np

ANSWER_MARKER = "####"
_FORMAT = re.compile(r"####\s*\S+\s*$")


def final_answer(text: str) -> Optional[str]:
    """The normalised final answer of `text`: what follows its last "####", or None when there is
    no marker or nothing after it. "#### 1,234." -> "1234"; "#### $5" -> "5"."""
    if ANSWER_MARKER not in text:
        return None
    answer = text.rsplit(ANSWER_MARKER, 1)[1].strip()
    answer = answer.replace(",", "").removeprefix("$").removesuffix(".").strip()
    return answer or None


def _number(text: str) -> Optional[decimal.Decimal]:
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(predicted: Optional[str], gold: str) -> bool:
    """Exact match of a normalised final answer with the gold: equal as numbers when both parse as
    decimals, else equal as strings. None (no answer) never matches."""
    if predicted is None:
        return False
    gold = str(gold).replace(",", "").strip()
    a, b = _number(predicted), _number(gold)
    if a is not None and b is not None:
        return a == b
    return predicted == gold


def exact_match(prompts: Sequence[str], responses: Sequence[str], *, answer: Sequence, **fields) -> list[float]:
    """1.0 when the response's final answer (after "####") equals the gold `answer` field, else 0.0.
    The gold judge of the arithmetic task and the usual GSM8K reward."""
    del prompts, fields
    return [float(answers_match(final_answer(r), a)) for r, a in zip(responses, answer)]


def answer_format(prompts: Sequence[str], responses: Sequence[str], **fields) -> list[float]:
    """1.0 when the response ends with "#### <one token>" (a parseable final answer), else 0.0: the
    format reward of RLVR recipes (e.g. DeepSeek-R1's format reward, here GSM8K's marker)."""
    del prompts, fields
    return [float(bool(_FORMAT.search(r))) for r in responses]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 − C(n − c, k) / C(n, k), computed as 1 − Π_{i=n−c+1..n} (1 − k / i) for numerical stability.
    Raises ValueError unless 0 <= c <= n and 1 <= k <= n."""
    n, c = int(num_samples), int(num_correct)
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= num_correct <= num_samples and 1 <= k <= num_samples, "
                         f"got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """Mean pass@k over problems from a `[problems, n]` 0/1 matrix of graded samples."""
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"mean_pass_at_k needs a [problems, samples] matrix, got shape {correct.shape}")
    n = correct.shape[1]
    return float(np.mean([pass_at_k(n, int(row.sum()), k) for row in correct]))

