"""A built-in verifiable task: short arithmetic word problems with integer answers, in GSM8K's format.

    "tom has 7 pens . then he buys 5 more . then he gives away 3 . how many pens now ?"
    worked solution: "7 + 5 = 12 . 12 - 3 = 9 . #### 9"

Difficulty is adjustable: `num_ops` (operations per problem, a range) and `max_value` (every number,
intermediate results included, stays in 0..max_value, one word each). The files are GSM8K JSONL
({"question", "answer": worked solution ending in "#### <answer>"}), so the same recipe runs on the
real GSM8K file; `rlhf_jax.tasks.answers.exact_match` is the exact-match gold judge and the reward,
`answers.answer_format` the format reward. Train and held-out problems never share a question
(`instructions.split_of`'s hash split). Everything is space-separated words, so the word-level
tokenizer (`tokenizer.build_tokenizer(arithmetic.words(max_value))`) round-trips exactly.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import numpy as np

from rlhf_jax.tasks.answers import ANSWER_MARKER
from rlhf_jax.tasks.instructions import split_of
from rlhf_jax.tasks.tokenizer import save_tokenizer

NAMES = {"tom": "he", "sam": "he", "ann": "she", "mia": "she"}
ITEMS = ("apples", "pens", "cards", "coins")
PHRASES = {"+": ("buys {b} more", "finds {b} more"), "-": ("gives away {b}", "loses {b}")}
FRAME_WORDS = ("has", "then", "how", "many", "now", "?", ".", "+", "-", "=", ANSWER_MARKER)


@dataclasses.dataclass(frozen=True)
class Problem:
    """`question` and its worked `solution` (ending "#### <answer>"); `answer` the integer gold."""

    question: str
    solution: str
    answer: int

    def record(self, solution: str | None = None) -> dict:
        """GSM8K JSONL record {"question", "answer": the worked solution}."""
        return {"question": self.question, "answer": self.solution if solution is None else solution}


def words(max_value: int) -> tuple[str, ...]:
    """Every word of the task (for the word-level tokenizer), no repeats."""
    phrase_words = {w for options in PHRASES.values() for p in options for w in p.split() if w != "{b}"}
    vocabulary = set(NAMES) | set(NAMES.values()) | set(ITEMS) | phrase_words | set(FRAME_WORDS)
    return tuple(sorted(vocabulary)) + tuple(str(i) for i in range(max_value + 1))


def make_problem(rng: np.random.Generator, num_ops: int, max_value: int) -> Problem:
    """One problem with `num_ops` additions / subtractions; all values in 0..max_value."""
    if num_ops < 1 or max_value < 2:
        raise ValueError(f"make_problem needs num_ops >= 1 and max_value >= 2, got {num_ops}, {max_value}")
    name = list(NAMES)[int(rng.integers(len(NAMES)))]
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    value = int(rng.integers(1, max_value + 1))
    sentences, steps = [f"{name} has {value} {item} ."], []
    for _ in range(num_ops):
        add = value < max_value and (value == 0 or rng.random() < 0.5)
        op = "+" if add else "-"
        b = int(rng.integers(1, (max_value - value if add else value) + 1))
        new = value + b if add else value - b
        phrase = PHRASES[op][int(rng.integers(len(PHRASES[op])))].format(b=b)
        sentences.append(f"then {NAMES[name]} {phrase} .")
        steps.append(f"{value} {op} {b} = {new} .")
        value = new
    question = " ".join(sentences) + f" how many {item} now ?"
    return Problem(question, " ".join(steps) + f" {ANSWER_MARKER} {value}", value)


def sample_problems(n: int, seed: int, split: str = "train", *, num_ops: Sequence[int] = (1, 2),
                    max_value: int = 20) -> list[Problem]:
    """`n` problems of `split` ("train" | "heldout"), deterministic in `seed`; each has
    num_ops[0]..num_ops[1] operations."""
    if split not in ("train", "heldout"):
        raise ValueError(f"sample_problems: split must be 'train' or 'heldout', got {split!r}")
    low, high = int(num_ops[0]), int(num_ops[-1])
    rng = np.random.default_rng([seed, 18])
    out = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        problem = make_problem(rng, int(rng.integers(low, high + 1)), max_value)
        if split_of(problem.question) == split:
            out.append(problem)
    raise ValueError(f"sample_problems: could not draw {n} distinct-split problems (num_ops={num_ops}, "
                     f"max_value={max_value})")


def demonstration(problem: Problem, rng: np.random.Generator, error_rate: float, max_value: int) -> str:
    """A worked solution, wrong w.p. `error_rate` (the last step's result and the final answer off
    by one: a plausible slip), as imperfect human demonstrations are."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"demonstration: error_rate must be in [0, 1], got {error_rate}")
    if rng.random() >= error_rate:
        return problem.solution
    wrong = problem.answer + (1 if problem.answer < max_value and (problem.answer == 0 or rng.random() < 0.5) else -1)
    body = problem.solution.rsplit(ANSWER_MARKER, 1)[0].rstrip().removesuffix(".").rstrip()
    head, _, _ = body.rpartition("=")
    return f"{head}= {wrong} . {ANSWER_MARKER} {wrong}"


def _write_jsonl(path: pathlib.Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def export_arithmetic(out_dir: str | pathlib.Path, *, seed: int = 0, n_sft: int = 2000, n_sft_eval: int = 100,
                      n_rl: int = 2000, n_heldout: int = 200, n_corpus: int = 4000, num_ops: Sequence[int] = (1, 2),
                      max_value: int = 20, error_rate: float = 0.2) -> dict[str, str]:
    """Write the task into `out_dir`; returns {name: path}: sft.jsonl / sft_eval.jsonl (demonstrations,
    train / held-out problems), ppo_prompts.jsonl and heldout.jsonl (correct solutions: the gold is the
    answer after "####"), corpus.txt (solved train problems, one per line) and tokenizer/."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(num_ops=num_ops, max_value=max_value)
    rng = np.random.default_rng([seed, 19])
    paths = {name: str(out / f) for name, f in (("sft", "sft.jsonl"), ("sft_eval", "sft_eval.jsonl"),
                                                  ("ppo_prompts", "ppo_prompts.jsonl"), ("heldout", "heldout.jsonl"),
                                                  ("corpus", "corpus.txt"), ("tokenizer", "tokenizer"))}
    sft = sample_problems(n_sft, seed * 4, "train", **kw)
    _write_jsonl(out / "sft.jsonl", (p.record(demonstration(p, rng, error_rate, max_value)) for p in sft))
    sft_eval = sample_problems(n_sft_eval, seed * 4 + 1, "heldout", **kw)
    _write_jsonl(out / "sft_eval.jsonl", (p.record() for p in sft_eval))
    _write_jsonl(out / "ppo_prompts.jsonl", (p.record() for p in sample_problems(n_rl, seed * 4 + 2, "train", **kw)))
    _write_jsonl(out / "heldout.jsonl", (p.record() for p in sample_problems(n_heldout, seed * 4 + 3, "heldout", **kw)))
    corpus = sample_problems(n_corpus, seed * 4 + 5, "train", **kw)
    (out / "corpus.txt").write_text("".join(f"{p.question} {p.solution}\n" for p in corpus), encoding="utf-8")
    save_tokenizer(paths["tokenizer"], words(max_value))
    return paths
