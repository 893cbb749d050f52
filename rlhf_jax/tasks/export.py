"""Write the task's data as the JSONL/text files the data package reads.

Training files carry only public text; the gold fields (kind, answer) go to a separate key
file (`gold.jsonl`, keyed by example id) that only evaluation and the simulated labelers read.

Formats (one JSON object per line, UTF-8):
- demonstrations: {"prompt", "response"}
- prompts:        {"prompt", "id"}
- rankings:       {"prompt", "responses": [...], "ranking": [indices, best first]}
- gold key:       {"id", "prompt", "kind", "answer"}
- corpus:         plain text, one document per line
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from rlhf_jax.tasks.instructions import Example, corpus, demonstration, sample_examples
from rlhf_jax.tasks.tokenizer import save_tokenizer

PathLike = str | os.PathLike


def _write_jsonl(path: PathLike, records: Iterable[dict]) -> int:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_demonstrations(path: PathLike, examples: Sequence[Example], seed: int, *,
                         error_rate: float = 0.25, verbose_rate: float = 0.3) -> int:
    """One imperfect `demonstration` per example as {"prompt", "response"}; returns the count."""
    rng = np.random.default_rng(seed)
    return _write_jsonl(path, ({"prompt": e.prompt,
                                "response": demonstration(e, rng, error_rate=error_rate,
                                                          verbose_rate=verbose_rate)}
                               for e in examples))


def write_prompts(path: PathLike, examples: Sequence[Example]) -> int:
    """{"prompt", "id"} per example (no gold fields); returns the count."""
    return _write_jsonl(path, ({"prompt": e.prompt, "id": e.id} for e in examples))


def write_rankings(path: PathLike, records: Sequence[dict]) -> int:
    """Ranking records from `labelers.collect_rankings`, validated; returns the count."""
    for line, record in enumerate(records, start=1):
        missing = {"prompt", "responses", "ranking"} - set(record)
        if missing:
            raise ValueError(f"{path}: ranking record {line} lacks {sorted(missing)}")
        if sorted(record["ranking"]) != list(range(len(record["responses"]))):
            raise ValueError(f"{path}: ranking record {line}: 'ranking' {record['ranking']} is "
                             f"not a permutation of its {len(record['responses'])} responses")
    return _write_jsonl(path, ({"prompt": r["prompt"], "responses": list(r["responses"]),
                                "ranking": [int(i) for i in r["ranking"]]} for r in records))


def write_corpus(path: PathLike, documents: Sequence[str]) -> int:
    """Plain text, one document per line; returns the count."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for line, doc in enumerate(documents, start=1):
        if "\n" in doc or not doc.strip():
            raise ValueError(f"{path}: document {line} is empty or spans several lines")
    path.write_text("".join(doc + "\n" for doc in documents), encoding="utf-8")
    return len(documents)


def write_gold(path: PathLike, examples: Sequence[Example]) -> int:
    """The hidden key {"id", "prompt", "kind", "answer"} per example; returns the count."""
    return _write_jsonl(path, ({"id": e.id, "prompt": e.prompt, "kind": e.kind,
                                "answer": e.answer} for e in examples))


def load_gold(path: PathLike) -> dict[str, Example]:
    """Read a `write_gold` file back into {id: Example} (errors name the file and line)."""
    examples: dict[str, Example] = {}
    with pathlib.Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                example = Example(id=record["id"], kind=record["kind"], prompt=record["prompt"],
                                  answer=record["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: bad gold record ({err!r})") from err
            if example.id in examples:
                raise ValueError(f"{path}:{line_no}: duplicate id {example.id!r}")
            examples[example.id] = example
    return examples


def export_task(out_dir: PathLike, *, seed: int = 0, n_sft: int = 2000,
                n_rm_prompts: int = 500, n_ppo_prompts: int = 2000, n_heldout: int = 200,
                n_corpus: int = 5000, error_rate: float = 0.25,
                verbose_rate: float = 0.3) -> dict[str, str]:
    """Write everything the pipeline needs into `out_dir`; returns {name: path}.

    sft.jsonl (demonstrations), rm_prompts.jsonl / ppo_prompts.jsonl (train split; rankings
    come later from SFT samples via `collect_rankings` + `write_rankings`),
    heldout_prompts.jsonl (heldout split), corpus.txt, gold.jsonl (key for every prompt file)
    and tokenizer/ (AutoTokenizer directory). Each prompt set draws from its own seed stream.
    """
    out = pathlib.Path(out_dir)
    sft = sample_examples(n_sft, seed=seed * 4, split="train")
    rm = sample_examples(n_rm_prompts, seed=seed * 4 + 1, split="train")
    ppo = sample_examples(n_ppo_prompts, seed=seed * 4 + 2, split="train")
    heldout = sample_examples(n_heldout, seed=seed, split="heldout")
    paths = {name: str(out / file) for name, file in (
        ("sft", "sft.jsonl"), ("rm_prompts", "rm_prompts.jsonl"),
        ("ppo_prompts", "ppo_prompts.jsonl"), ("heldout_prompts", "heldout_prompts.jsonl"),
        ("corpus", "corpus.txt"), ("gold", "gold.jsonl"), ("tokenizer", "tokenizer"))}
    write_demonstrations(paths["sft"], sft, seed, error_rate=error_rate,
                         verbose_rate=verbose_rate)
    write_prompts(paths["rm_prompts"], rm)
    write_prompts(paths["ppo_prompts"], ppo)
    write_prompts(paths["heldout_prompts"], heldout)
    write_corpus(paths["corpus"], corpus(n_corpus, seed))
    write_gold(paths["gold"], rm + ppo + heldout)
    save_tokenizer(paths["tokenizer"])
    return paths
