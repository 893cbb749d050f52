"""The built-in task as the standalone SFT and RM stages use it (no data files configured).

Written once into WORKDIR/task (deterministic in the seed) and reused on resume.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from rlhf_jax.tasks.export import export_task, write_demonstrations, write_rankings
from rlhf_jax.tasks.instructions import demonstration, sample_examples
from rlhf_jax.tasks.labelers import collect_rankings


def builtin_task(workdir: str, seed: int) -> dict:
    """Export the built-in instruction task into WORKDIR/task once (deterministic in `seed`),
    plus `sft_eval.jsonl`: demonstrations of held-out prompts. Returns {name: path}."""
    out = pathlib.Path(workdir) / "task"
    index = out / "files.json"
    if index.exists():
        return json.loads(index.read_text())
    paths = export_task(out, seed=seed)
    paths["sft_eval"] = str(out / "sft_eval.jsonl")
    write_demonstrations(paths["sft_eval"], sample_examples(200, seed, split="heldout"), seed + 1)
    if jax.process_index() == 0:
        index.write_text(json.dumps(paths, indent=2))
    return paths


def builtin_rankings(workdir: str, seed: int, num_prompts: int, num_responses: int, error_rate: float,
                     labeler_temperature: float) -> dict:
    """Rankings from the built-in task (written once into WORKDIR/task): per prompt, K =
    `num_responses` distinct imperfect demonstrations (wrong w.p. `error_rate`) ranked by a simulated
    labeler from their gold scores; a quarter as many held-out prompts. A prompt whose demonstrations
    stay identical after 32 draws each is skipped (identical responses carry no preference; drawing
    with repeats dropped 15% of the K = 2 rows). Returns the task files plus "rm_train" / "rm_eval"."""
    files = builtin_task(workdir, seed)
    out = pathlib.Path(workdir) / "task"
    for name, split, count in (("rm_train", "train", num_prompts), ("rm_eval", "heldout", max(num_prompts // 4, 1))):
        path = out / f"{name}_k{num_responses}.jsonl"
        files[name] = str(path)
        if path.exists() or jax.process_index() != 0:
            continue
        rng = np.random.default_rng([seed, 7, split == "train"])
        examples = sample_examples(count, seed=seed + 1000, split=split)
        drawn = [distinct_demonstrations(e, rng, num_responses, error_rate) for e in examples]
        kept = [(e, r) for e, r in zip(examples, drawn) if r is not None]
        records = collect_rankings([e for e, _ in kept], [r for _, r in kept], rng, temperature=labeler_temperature)
        tmp = path.with_suffix(".tmp")
        write_rankings(tmp, records)
        tmp.rename(path)
    return files


def distinct_demonstrations(example, rng: np.random.Generator, k: int, error_rate: float,
                            tries: int = 32) -> list[str] | None:
    """`k` different demonstrations of `example` (each new one redrawn up to `tries` times while it
    repeats an earlier one), or None when the task cannot give that many."""
    out: list[str] = []
    for _ in range(k):
        for _ in range(tries):
            text = demonstration(example, rng, error_rate=error_rate)
            if text not in out:
                out.append(text)
                break
        else:
            return None
    return out
