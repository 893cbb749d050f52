"""Synthetic, learnable stand-in data for standalone runs without files (tiny presets, tests).

Batch s of a stream is a pure function of (seed, s); every process takes its contiguous slice of
the global batch; the position (batches drawn) is the iterator state saved with checkpoints.
"""
from __future__ import annotations

import abc
from typing import Mapping

import numpy as np


class _SeededStream(abc.ABC):
    """A checkpointable iterator whose batch s is `self.make(np.random.default_rng([seed, stream, s]))`,
    sliced to this process's rows."""

    stream = 0  # distinguishes the random streams of different kinds of data under one seed

    def __init__(self, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.batch_size, self.seed = batch_size, seed
        per_process = batch_size // process_count
        self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
        self.position = 0

    @abc.abstractmethod
    def make(self, rng: np.random.Generator) -> dict:
        """The global batch drawn from `rng` (all processes' rows)."""

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.stream, self.position])
        self.position += 1
        return {key: value[self.rows] for key, value in self.make(rng).items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: Mapping) -> None:
        self.position = int(state["position"])


class SyntheticPrompts(_SeededStream):
    """Random-token prompts of random length in [min_len, prompt_len], left-padded to `prompt_len`:
    {prompt_ids, prompt_mask [B, P] int32, index [B] (global row number)}. Tokens avoid the
    `reserved` ids (pad, EOS)."""

    stream = 1

    def __init__(self, batch_size: int, prompt_len: int, min_len: int, vocab_size: int, reserved, seed: int,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(batch_size, seed, process_index, process_count)
        self.prompt_len, self.min_len = prompt_len, min_len
        self.choices = np.array([t for t in range(vocab_size) if t not in set(reserved)], np.int32)

    def make(self, rng: np.random.Generator) -> dict:
        ids = rng.choice(self.choices, size=(self.batch_size, self.prompt_len)).astype(np.int32)
        lengths = rng.integers(self.min_len, self.prompt_len + 1, size=self.batch_size)
        mask = (np.arange(self.prompt_len)[None, :] >= self.prompt_len - lengths[:, None]).astype(np.int32)
        index = (self.position - 1) * self.batch_size + np.arange(self.batch_size)
        return {"prompt_ids": ids * mask, "prompt_mask": mask, "index": index.astype(np.int32)}


class SyntheticText(_SeededStream):
    """LM batches of counting sequences (a, a+1, a+2, ... mod vocab, over ids >= `low`): a learnable
    stand-in corpus for standalone PPO-ptx runs; {input_ids, attention_mask, loss_mask [B, T]}."""

    stream = 2

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, low: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(batch_size, seed, process_index, process_count)
        self.seq_len, self.vocab_size, self.low = seq_len, vocab_size, low

    def make(self, rng: np.random.Generator) -> dict:
        span = self.vocab_size - self.low
        start = rng.integers(0, span, size=(self.batch_size, 1))
        ids = (self.low + (start + np.arange(self.seq_len)[None, :]) % span).astype(np.int32)
        ones = np.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
