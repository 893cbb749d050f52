"""The InstructGPT recipe end to end on the built-in task: stage orchestration and evaluation.

    task -> pretrain -> sft -> rankings -> rm -> ppo -> eval        (DIR/<stage>/ for each)

- task:     export the instruction task (demonstrations, prompts, corpus, hidden gold key, tokenizer).
- pretrain: the SFT trainer on the corpus with the loss on every token (a small base model).
- sft:      the SFT trainer on the imperfect demonstrations, from the pretrained model.
- rankings: K distinct SFT samples per RM prompt, gold-scored and ranked by a simulated labeler
            (Plackett-Luce at `labelers.temperature`); a held-out share of prompts for RM accuracy.
- rm:       the RM trainer on the rankings (ranking loss), from the SFT model.
- ppo:      the PPO trainer: actor and reference from SFT, critic and reward from the RM.
- eval:     held-out prompts: SFT vs PPO samples under the gold judge, best-of-4 reranked by the RM,
            KL to SFT; summary.json, report.md and plots in DIR.

A stage writes `DIR/<stage>/DONE` (JSON: seconds, stage facts) after it completes; a re-run
with the same DIR skips finished stages, and an interrupted stage resumes from its own
checkpoints (the trainers resume from their workdir).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import tqdm
from absl import logging

from rlhf_jax import evaluation, report, tasks

DONE = "DONE"
STAGES = ("task", "pretrain", "sft", "rankings", "rm", "ppo", "eval")


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------
def stage_info(stage_dir: str | pathlib.Path) -> dict | None:
    """The DONE record of a finished stage, or None when the stage has not completed."""
    marker = pathlib.Path(stage_dir) / DONE
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{marker}: unreadable stage marker ({err}); delete it to re-run the stage") from err


def mark_done(stage_dir: str | pathlib.Path, record: Mapping[str, Any]) -> None:
    """Write the DONE marker atomically (write a temp file, then rename)."""
    stage_dir = pathlib.Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{DONE}.tmp"
    tmp.write_text(json.dumps(dict(record), indent=2, allow_nan=False) + "\n")
    tmp.rename(stage_dir / DONE)


def run_stage(name: str, stage_dir: str | pathlib.Path, fn: Callable[[], Mapping[str, Any] | None],
              echo: Callable[[str], None] = print) -> dict:
    """Run `fn()` unless `stage_dir` has a DONE marker; returns the DONE record.

    The record is {"stage", "seconds", "info"} where info is what `fn` returned (JSON-able facts
    later stages need, e.g. the labeler agreement).
    """
    done = stage_info(stage_dir)
    if done is not None:
        echo(f"[{name}] done already ({done['seconds']:.0f}s when it ran): skipping")
        return done
    echo(f"[{name}] running in {stage_dir}")
    start = time.perf_counter()
    info = dict(fn() or {})
    record = {"stage": name, "seconds": time.perf_counter() - start, "info": info}
    mark_done(stage_dir, record)
    echo(f"[{name}] finished in {record['seconds']:.0f}s")
    return record


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every stage of one pipeline run lives under its workdir."""

    root: pathlib.Path

    def stage(self, name: str) -> pathlib.Path:
        if name not in STAGES:
            raise ValueError(f"unknown pipeline stage {name!r} (stages: {STAGES})")
        return self.root / name

    @property
    def task(self) -> pathlib.Path:
        return self.stage("task")

    def task_file(self, name: str) -> str:
        return str(self.task / name)

    @property
    def tokenizer(self) -> str:
        return self.task_file("tokenizer")

    @property
    def rankings_train(self) -> str:
        return str(self.stage("rankings") / "rankings_train.jsonl")

    @property
    def rankings_heldout(self) -> str:
        return str(self.stage("rankings") / "rankings_heldout.jsonl")

    @property
    def data_cache(self) -> str:
        return str(self.root / "data_cache")


# ----------------------------------------------------------------------------------------------
# Prompts with their hidden gold examples
# ----------------------------------------------------------------------------------------------
def read_prompt_ids(path: str) -> list[str]:
    """The "id" of every row of a prompts JSONL file, in file order (row i <-> batch index i)."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                record = json.loads(line)
                if "id" not in record:
                    raise ValueError(f"{path}:{line_no}: prompt record lacks 'id' (needed to find its gold key)")
                ids.append(record["id"])
    return ids


@dataclasses.dataclass
class PromptSet:
    """All prompts of one file as one left-padded batch, plus their hidden gold examples."""

    prompt_ids: np.ndarray  # [R, P]
    prompt_mask: np.ndarray  # [R, P]
    examples: list  # [R] tasks.Example, row-aligned

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, rows: np.ndarray | slice) -> "PromptSet":
        rows_list = np.arange(len(self))[rows]
        return PromptSet(self.prompt_ids[rows_list], self.prompt_mask[rows_list],
                         [self.examples[i] for i in rows_list])


def load_prompt_set(path: str, tokenizer, gold: Mapping[str, Any], prompt_len: int, data_dir: str) -> PromptSet:
    """Tokenize a prompts JSONL exactly as the PPO trainer does (data package, chat template,
    left padding to `prompt_len`) and attach each row's gold example by its id."""
    from rlhf_jax import data  # late import: TFDS is only needed when a stage actually runs

    split = data.load_split("prompts", path, tokenizer, max_len=prompt_len, data_dir=data_dir)
    batch = split.collate(np.arange(len(split)))
    ids = read_prompt_ids(path)
    missing = [ids[i] for i in batch["index"] if ids[i] not in gold]
    if missing:
        raise ValueError(f"{path}: prompt ids {missing[:5]} have no entry in the gold key")
    return PromptSet(batch["prompt_ids"], batch["prompt_mask"], [gold[ids[i]] for i in batch["index"]])


# ----------------------------------------------------------------------------------------------
# Rankings: sample K distinct SFT responses per prompt, rank them with a simulated labeler
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample responses (shared by the rankings stage and evaluation)."""

    batch_size: int
    max_new_tokens: int
    temperature: float
    eos_id: int
    pad_id: int


def sample_texts(model, params, prompts: PromptSet, rng: jax.Array, num_samples: int, sampling: Sampling,
                 tokenizer) -> tuple[dict, list[list[str]]]:
    """`num_samples` responses per prompt: the raw arrays [R, S, N] and the decoded texts [R][S]."""
    out = evaluation.sample_responses(model, params, prompts.prompt_ids, prompts.prompt_mask, rng,
                                      num_samples=num_samples, batch_size=sampling.batch_size,
                                      max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                      eos_id=sampling.eos_id, pad_id=sampling.pad_id)
    flat = evaluation.decode_responses(tokenizer, out["tokens"].reshape(-1, out["tokens"].shape[-1]),
                                       out["mask"].reshape(-1, out["mask"].shape[-1]), sampling.eos_id)
    texts = [flat[r * num_samples:(r + 1) * num_samples] for r in range(len(prompts))]
    return out, texts


def distinct_candidates(texts: list[list[str]], k: int) -> tuple[list[int], list[list[str]]]:
    """Rows with at least `k` distinct non-empty responses and their first `k` distinct ones."""
    rows, chosen = [], []
    for row, candidates in enumerate(texts):
        picked = evaluation.distinct_first([c for c in candidates if c], k)
        if picked is not None:
            nonempty = [c for c in candidates if c]
            rows.append(row)
            chosen.append([nonempty[i] for i in picked])
    return rows, chosen


def label_rankings(examples: list, responses: list[list[str]], temperature: float, seed: int) -> tuple[list[dict], list]:
    """Simulated labeler rankings plus the gold scores behind them (for the agreement ceiling)."""
    rng = np.random.default_rng(seed)
    records = tasks.collect_rankings(examples, responses, rng, temperature)
    gold_sets = [tasks.gold_scores([e] * len(r), r) for e, r in zip(examples, responses)]
    return records, gold_sets
