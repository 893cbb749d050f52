"""What the rankings and eval stages share: prompt sets with their hidden gold examples, the
models of finished stages on one device, and sampling responses as PPO does."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import numpy as np

from rlhf_jax import evaluation
from rlhf_jax.data import chat


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
    # late import: rlhf_jax.data imports TensorFlow-Datasets, needed only when a stage runs (not
    # by `import rlhf_jax.pipeline` in the scripts' flag parsing or the unit tests)
    from rlhf_jax import data

    split = data.load_split("prompts", path, tokenizer, max_len=prompt_len, data_dir=data_dir)
    batch = split.collate(np.arange(len(split)))
    ids = read_prompt_ids(path)
    missing = [ids[i] for i in batch["index"] if ids[i] not in gold]
    if missing:
        raise ValueError(f"{path}: prompt ids {missing[:5]} have no entry in the gold key")
    return PromptSet(batch["prompt_ids"], batch["prompt_mask"], [gold[ids[i]] for i in batch["index"]])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample responses (shared by the rankings stage and evaluation)."""

    batch_size: int
    max_new_tokens: int
    temperature: float
    eos_id: tuple[int, ...]  # the stop set (chat.stop_ids)
    pad_id: int


def sampling_settings(config, tokenizer, temperature: float, batch_size: int) -> Sampling:
    """Sampling as PPO does it: the rollout's response length, the tokenizer's stop and pad ids."""
    return Sampling(batch_size=batch_size, max_new_tokens=config.ppo.rollout.max_new_tokens,
                    temperature=float(temperature), eos_id=chat.stop_ids(tokenizer),
                    pad_id=int(tokenizer.pad_token_id))


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
