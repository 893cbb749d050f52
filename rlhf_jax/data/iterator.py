"""A checkpointable, process-sharded batch iterator over a random-access dataset.

The order of epoch e is a pure function of (seed, e): a permutation drawn by
`np.random.default_rng([seed, e])` (or file order when shuffle=False), cut into global batches of
`batch_size` rows. The position is just (epoch, batch within the epoch), so `get_state()` is a dict
of ints that goes into the checkpoint and `set_state()` resumes with exactly the batch that would
have come next.

Multi-host: the global batch is the same on every process; process p of n takes the contiguous
rows [p*B/n, (p+1)*B/n) and collates (reads) only those, so the local batches of all processes
concatenated in process order are the global batch (what
`jax.make_array_from_process_local_data` expects). batch_size must be divisible by n.

drop_remainder=True (training): each epoch yields floor(N / B) batches; the N mod B rows at the
end of that epoch's permutation are skipped for that epoch only (the next epoch reshuffles).
drop_remainder=False (evaluation): every row is seen once per epoch; the last batch is filled up
to B with padding rows (masks 0, index -1, ranks -1) so its shape is the same as the others.

Length bucketing (`lengths` + `bucket_window`): after shuffling, windows of bucket_window
batches are sorted by length and cut into batches, and the batch order is shuffled again, so a
batch holds rows of similar length; the collate function then pads to a bucket boundary.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

STATE_KEYS = ("epoch", "batch_in_epoch", "num_examples", "batch_size", "seed")


def default_process() -> tuple[int, int]:
    import jax  # late import: the data package is usable without initialising a backend

    return jax.process_index(), jax.process_count()


def epoch_plan(num_examples: int, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
               drop_remainder: bool = True, lengths: Sequence[int] | None = None,
               bucket_window: int = 0) -> np.ndarray:
    """Row indices of every global batch of an epoch: int64 [num_batches, batch_size], -1 = padding."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples) if shuffle else np.arange(num_examples)
    if drop_remainder:
        order = order[: num_examples - num_examples % batch_size]
    else:
        order = np.concatenate([order, np.full(-num_examples % batch_size, -1)])
    batches = order.reshape(-1, batch_size)
    if lengths is not None and bucket_window > 1:
        lengths = np.asarray(lengths)
        windows = [order[s: s + bucket_window * batch_size] for s in range(0, len(order), bucket_window * batch_size)]
        key = lambda rows: np.where(rows < 0, np.iinfo(np.int64).max, lengths[np.maximum(rows, 0)])  # noqa: E731
        batches = np.concatenate([w[np.argsort(key(w), kind="stable")] for w in windows]).reshape(-1, batch_size)
        batches = batches[rng.permutation(len(batches))] if shuffle else batches
    return batches.astype(np.int64)


class BatchIterator:
    """Yields this process's numpy batches; see the module docstring for order and state."""

    def __init__(self, num_examples: int, collate: Callable[[np.ndarray], dict], batch_size: int, seed: int = 0,
                 *, shuffle: bool = True, drop_remainder: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 lengths: Sequence[int] | None = None, bucket_window: int = 0):
        if process_index is None or process_count is None:
            process_index, process_count = default_process()
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be positive and divisible by the "
                             f"process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if drop_remainder and num_examples < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {num_examples} examples; "
                             "with drop_remainder=True an epoch would be empty")
        self.num_examples, self.collate, self.batch_size, self.seed = num_examples, collate, batch_size, seed
        self.shuffle, self.drop_remainder, self.num_epochs = shuffle, drop_remainder, num_epochs
        self.lengths, self.bucket_window = lengths, bucket_window
        per_process = batch_size // process_count
        self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
        self.epoch, self.batch_in_epoch = 0, 0
        self._plan_epoch, self._plan = None, None

    def plan(self, epoch: int) -> np.ndarray:
        """The global batches of `epoch` (cached for the current epoch)."""
        if self._plan_epoch != epoch:
            self._plan = epoch_plan(self.num_examples, self.batch_size, self.seed, epoch, shuffle=self.shuffle,
                                    drop_remainder=self.drop_remainder, lengths=self.lengths,
                                    bucket_window=self.bucket_window)
            self._plan_epoch = epoch
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch_in_epoch >= len(self.plan(self.epoch)):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self.plan(self.epoch)[self.batch_in_epoch][self.rows]
        self.batch_in_epoch += 1
        return self.collate(rows)

    def get_state(self) -> dict[str, int]:
        """Position plus what it is only valid for (checked by set_state)."""
        return {"epoch": int(self.epoch), "batch_in_epoch": int(self.batch_in_epoch),
                "num_examples": int(self.num_examples), "batch_size": int(self.batch_size), "seed": int(self.seed)}

    def set_state(self, state: dict) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"iterator state lacks {missing}; expected keys {STATE_KEYS}")
        for key in ("num_examples", "batch_size", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"iterator state was saved with {key}={int(state[key])}, but this iterator has "
                                 f"{key}={getattr(self, key)}: resuming would not replay the same examples")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
