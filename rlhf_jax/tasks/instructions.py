"""A tiny instruction-following task with a hidden gold oracle (InstructGPT in miniature).

Prompts are short instructions over a few letters or numbers ("sort : d a c", "repeat 3 times
: a b"); the correct answer is a handful of space-separated words ("a c d"). Everything is
lower-case words separated by single spaces, so a word-level tokenizer covers it exactly.

The pieces an RLHF pipeline needs:
- `sample_examples`: deterministic generator with train/heldout splits that never share a prompt.
- `gold_score` / `gold_scores`: the hidden judge in [0, 1] (correctness with partial credit,
  times a brevity factor). Training never sees it; it drives the simulated labelers and the
  final evaluation.
- `demonstration`: imperfect human-like demonstrations for SFT (some wrong, some verbose).
- `corpus`: pretraining text from the same distribution (solved instructions plus filler).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------- vocabulary

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
UPPER_LETTERS = tuple(c.upper() for c in LETTERS)
VOWELS = frozenset("aeiou")
MAX_NUMBER = 19  # numbers in prompts and answers are 0..MAX_NUMBER
NUMBERS = tuple(str(i) for i in range(MAX_NUMBER + 1))

KINDS = ("sort", "reverse", "count", "uppercase", "novowels", "repeat", "first", "largest")
"""Instruction kinds. Prompt templates (items are letters or numbers):
sort : d a c -> a c d | reverse : d a c -> c a d | count : d a c -> 3 |
uppercase : d a c -> D A C | remove vowels : d a e c -> d c | repeat 2 times : a b -> a b a b |
first 2 : d a c -> d a | largest : 3 9 4 -> 9
"""

PREAMBLES = ("sure ! the answer is :", "here you go :", "ok , the answer is")
"""Chatty openings a verbose demonstrator puts before the answer (the gold judge dislikes them)."""
SUFFIXES = ("hope this helps !", "is there anything else ?")
"""Chatty closings a verbose demonstrator sometimes puts after the answer."""
ANSWER_SEPARATOR = "="
"""Separates instruction and answer in the pretraining corpus: "sort : d a c = a c d"."""
SEGMENT_SEPARATOR = "."
"""Separates the segments of one corpus document."""
FILLER_WORDS = ("the", "a", "is", "and", "of", "list", "word", "letter", "number", "items",
                "answer", "question", "then", "next", "so", "it")

INSTRUCTION_WORDS = ("sort", "reverse", "count", "uppercase", "remove", "vowels", "repeat",
                     "times", "first", "largest", ":")


def task_words() -> tuple[str, ...]:
    """Every word the task can produce (prompts, answers, chatter, corpus), sorted, no repeats."""
    chatter = " ".join(PREAMBLES + SUFFIXES).split()
    words = set(LETTERS + UPPER_LETTERS + NUMBERS + INSTRUCTION_WORDS + FILLER_WORDS)
    words.update(chatter)
    words.update((ANSWER_SEPARATOR, SEGMENT_SEPARATOR))
    return tuple(sorted(words))


# ----------------------------------------------------------------------------- examples

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
"""Fraction of the prompt space reserved for evaluation (decided by a hash of the prompt)."""

MIN_ITEMS, MAX_ITEMS = 2, 6
REPEAT_TIMES = (2, 3, 4)
REPEAT_MAX_ITEMS = 3  # repeat answers stay <= 12 words


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction. `prompt` is public; `kind` and `answer` are the hidden gold fields."""

    id: str
    kind: str
    prompt: str
    answer: str


def split_of(prompt: str) -> str:
    """'heldout' for a fixed HELDOUT_FRACTION of prompts (stable blake2b hash), else 'train'."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 10_000
    return "heldout" if bucket < HELDOUT_FRACTION * 10_000 else "train"


def _draw_items(rng: np.random.Generator, use_numbers: bool, n_items: int) -> list[str]:
    pool = NUMBERS if use_numbers else LETTERS
    return [pool[i] for i in rng.choice(len(pool), size=n_items, replace=False)]


def _solve(kind: str, items: Sequence[str], n: int) -> str:
    """The correct answer for an instruction of `kind` over `items` (n = repeat/first count)."""
    if kind == "sort":
        key = int if items[0].isdigit() else str
        return " ".join(sorted(items, key=key))
    if kind == "reverse":
        return " ".join(reversed(items))
    if kind == "count":
        return str(len(items))
    if kind == "uppercase":
        return " ".join(item.upper() for item in items)
    if kind == "novowels":
        return " ".join(item for item in items if item not in VOWELS)
    if kind == "repeat":
        return " ".join(list(items) * n)
    if kind == "first":
        return " ".join(items[:n])
    if kind == "largest":
        return str(max(int(item) for item in items))
    raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")


def _draw_instruction(rng: np.random.Generator, kind: str) -> tuple[str, str]:
    """(prompt, answer) for one random instruction of `kind`."""
    use_numbers = kind == "largest" or (kind in ("sort", "reverse", "count", "first")
                                        and rng.random() < 0.5)
    max_items = REPEAT_MAX_ITEMS if kind == "repeat" else MAX_ITEMS
    min_items = 1 if kind == "repeat" else MIN_ITEMS
    items = _draw_items(rng, use_numbers, int(rng.integers(min_items, max_items + 1)))
    if kind == "novowels" and all(item in VOWELS for item in items):
        items[0] = "x"  # keep the answer non-empty (items stay distinct: x is not a vowel)
    n = 0
    if kind == "repeat":
        n = int(rng.choice(REPEAT_TIMES))
        head = f"repeat {n} times"
    elif kind == "first":
        n = int(rng.integers(1, len(items)))
        head = f"first {n}"
    elif kind == "novowels":
        head = "remove vowels"
    else:
        head = kind
    return f"{head} : {' '.join(items)}", _solve(kind, items, n)


def sample_examples(n: int, seed: int, split: str = "train",
                    kinds: Sequence[str] = KINDS) -> list[Example]:
    """`n` examples of `split` ('train' | 'heldout'), deterministic in (seed, split, index).

    Example i depends only on (seed, split, i), so a longer list extends a shorter one. Kinds
    are drawn uniformly from `kinds`. Prompts may repeat within a split; a prompt never
    appears in both splits (`split_of`). Ids are "{split}-{seed}-{i}".
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    split_code = SPLITS.index(split)
    examples = []
    for index in range(n):
        rng = np.random.default_rng([seed, split_code, index])
        while True:  # rejection: ~1.25 draws for train, ~5 for heldout
            kind = kinds[int(rng.integers(len(kinds)))]
            prompt, answer = _draw_instruction(rng, kind)
            if split_of(prompt) == split:
                break
        examples.append(Example(id=f"{split}-{seed}-{index}", kind=kind, prompt=prompt,
                                answer=answer))
    return examples


# ----------------------------------------------------------------------------- gold judge

EXTRA_WORD_PENALTY = 0.1
"""Brevity: each word beyond the answer's length costs this much (10 extra words -> 0)."""


def _substitution_cost(expected: str, got: str) -> float:
    """0 if equal; 0.5 for the right letter in the wrong case; |a-b|/2 (<= 1) for numbers."""
    if expected == got:
        return 0.0
    if expected.lower() == got.lower():
        return 0.5
    if expected.isdigit() and got.isdigit():
        return min(1.0, abs(int(expected) - int(got)) / 2)
    return 1.0


def answer_distance(answer: Sequence[str], response: Sequence[str]) -> float:
    """Edit distance from `answer` to the best-matching contiguous span of `response`.

    Semi-global alignment (Sellers 1980): skipping words before/after the span is free
    (the brevity factor charges for them), insertions and deletions cost 1, substitutions
    cost `_substitution_cost`. So one swapped pair costs 1 ("a d c" vs "a c d": span "a d",
    one deletion), like a Damerau transposition.
    """
    m, n = len(answer), len(response)
    prev = np.zeros(n + 1)  # row 0: free start anywhere in the response
    for i in range(1, m + 1):
        row = np.empty(n + 1)
        row[0] = i
        for j in range(1, n + 1):
            row[j] = min(prev[j] + 1.0, row[j - 1] + 1.0,
                         prev[j - 1] + _substitution_cost(answer[i - 1], response[j - 1]))
        prev = row
    return float(prev.min())  # free end anywhere in the response


def gold_score(example: Example, response: str) -> float:
    """Hidden judge in [0, 1]: correctness x brevity, deterministic.

    correctness = max(0, 1 - answer_distance / len(answer))   (partial credit per word)
    brevity     = max(0, 1 - EXTRA_WORD_PENALTY * max(0, len(response) - len(answer)))
    with lengths in words. Exact answer -> 1; empty -> 0; "sure ! the answer is : a c d" for
    answer "a c d" -> 1 * (1 - 0.1 * 6) = 0.4.
    """
    answer = example.answer.split()
    words = response.split()
    correctness = max(0.0, 1.0 - answer_distance(answer, words) / len(answer))
    brevity = max(0.0, 1.0 - EXTRA_WORD_PENALTY * max(0, len(words) - len(answer)))
    return correctness * brevity


def gold_scores(examples: Sequence[Example], responses: Sequence[str]) -> np.ndarray:
    """`gold_score` of each (example, response) pair -> float64 array [N]."""
    if len(examples) != len(responses):
        raise ValueError(f"gold_scores got {len(examples)} examples but {len(responses)} "
                         "responses; they must pair up one to one")
    return np.array([gold_score(e, r) for e, r in zip(examples, responses)], dtype=np.float64)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Fraction of prompts where `scores` beats `baseline_scores`; ties count one half."""
    a, b = np.asarray(scores, np.float64), np.asarray(baseline_scores, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate needs two equal non-empty 1-D arrays, got {a.shape}, {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b)))


# ----------------------------------------------------------------------------- demonstrations

def _corrupt(example: Example, rng: np.random.Generator) -> str:
    """A plausible wrong answer (always different from the gold answer)."""
    words = example.answer.split()
    options = ["substitute"]
    if len(words) >= 2:
        options += ["swap", "drop"]
    if example.kind in ("sort", "reverse", "first", "repeat"):
        options.append("unchanged_items")  # e.g. echo the input instead of transforming it
    choice = options[int(rng.integers(len(options)))]
    wrong = list(words)
    if choice == "swap":
        i = int(rng.integers(len(words) - 1))
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif choice == "drop":
        del wrong[int(rng.integers(len(words)))]
    elif choice == "unchanged_items":
        wrong = example.prompt.split(":", 1)[1].split()
    if wrong == words or choice == "substitute":
        wrong = list(words)
        i = int(rng.integers(len(words)))
        wrong[i] = _other_word(words[i], rng)
    return " ".join(wrong)


def _other_word(word: str, rng: np.random.Generator) -> str:
    """A different word of the same type: number +-1/2, or another letter in the same case."""
    if word.isdigit():
        value = int(word)
        candidates = [v for v in (value - 2, value - 1, value + 1, value + 2)
                      if 0 <= v <= MAX_NUMBER]
        return str(candidates[int(rng.integers(len(candidates)))])
    pool = UPPER_LETTERS if word.isupper() else LETTERS
    candidates = [c for c in pool if c != word]
    return candidates[int(rng.integers(len(candidates)))]


def demonstration(example: Example, rng: np.random.Generator, *, error_rate: float = 0.25,
                  verbose_rate: float = 0.3) -> str:
    """An imperfect human demonstration: wrong w.p. `error_rate`, chatty w.p. `verbose_rate`.

    The two flaws are independent. A wrong answer is a small corruption (swap, drop, wrong
    word, or the untransformed input); a chatty one wraps the answer in a PREAMBLES opening and,
    half the time, a SUFFIXES closing. SFT on these is mediocre on purpose, leaving RLHF room.
    """
    for name, rate in (("error_rate", error_rate), ("verbose_rate", verbose_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"demonstration: {name} must be in [0, 1], got {rate}")
    wrong = rng.random() < error_rate
    verbose = rng.random() < verbose_rate
    text = _corrupt(example, rng) if wrong else example.answer
    if verbose:
        text = f"{PREAMBLES[int(rng.integers(len(PREAMBLES)))]} {text}"
        if rng.random() < 0.5:
            text = f"{text} {SUFFIXES[int(rng.integers(len(SUFFIXES)))]}"
    return text


# ----------------------------------------------------------------------------- corpus

def corpus(n: int, seed: int, *, filler_rate: float = 0.3, max_segments: int = 3,
           kinds: Sequence[str] = KINDS) -> list[str]:
    """`n` pretraining documents (one line each) from the task distribution.

    Each document joins 1..max_segments segments with " . ": a solved instruction
    "{prompt} = {answer}" (train split only, so heldout prompts stay unseen), or, with
    probability `filler_rate`, 4-12 random task words (never the separators). Deterministic in (seed, index).
    """
    if not 0.0 <= filler_rate <= 1.0:
        raise ValueError(f"corpus: filler_rate must be in [0, 1], got {filler_rate}")
    if max_segments < 1:
        raise ValueError(f"corpus: max_segments must be >= 1, got {max_segments}")
    vocabulary = [w for w in task_words() if w not in (ANSWER_SEPARATOR, SEGMENT_SEPARATOR)]
    docs = []
    for index in range(n):
        rng = np.random.default_rng([seed, 7, index])
        n_segments = int(rng.integers(1, max_segments + 1))
        solved = iter(sample_examples(n_segments, seed=int(rng.integers(2**31)), kinds=kinds))
        segments = []
        for _ in range(n_segments):
            if rng.random() < filler_rate:
                length = int(rng.integers(4, 13))
                segments.append(" ".join(vocabulary[i] for i in
                                         rng.integers(len(vocabulary), size=length)))
            else:
                example = next(solved)
                segments.append(f"{example.prompt} {ANSWER_SEPARATOR} {example.answer}")
        docs.append(f" {SEGMENT_SEPARATOR} ".join(segments))
    return docs
