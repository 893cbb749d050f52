"""Padding token examples into the shared numpy batch formats (fixed shapes, int32).

- LM/SFT:  {"input_ids", "attention_mask", "loss_mask"} [B, T], RIGHT-padded.
- Ranking: {"input_ids", "attention_mask", "loss_mask" (response targets)} [P, K, T] right-padded,
  "ranks" [P, K] (0 = best); "ref_logps" [P, K] fp32 too when the examples carry it (DPO).
- Prompts: {"prompt_ids", "prompt_mask"} [B, P] LEFT-padded (generation continues at the right
  edge), "index" [B] = row of the source file.
A `None` example is a padding row (only used for the last batch when drop_remainder=False): all
masks 0, ranks -1, index -1, so it adds nothing to masked losses; the trainer skips index -1.
`pad_len` is the sequence length T (or P); `bucket_length` picks it from bucket boundaries.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


def bucket_length(longest: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary >= longest (boundaries sorted ascending, the last is max_len)."""
    i = bisect.bisect_left(boundaries, longest)
    if i == len(boundaries):
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {boundaries[-1]}")
    return int(boundaries[i])


def _pad_right(seqs: Sequence[np.ndarray | None], pad_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), pad_len), pad_id, np.int32)
    mask = np.zeros((len(seqs), pad_len), np.int32)
    for i, s in enumerate(seqs):
        if s is not None:
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
    return ids, mask


def collate_lm(examples: Sequence[dict | None], pad_len: int, pad_id: int) -> dict:
    ids, mask = _pad_right([e and e["input_ids"] for e in examples], pad_len, pad_id)
    loss, _ = _pad_right([e and e["loss_mask"] for e in examples], pad_len, 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss * mask}


def collate_ranking(examples: Sequence[dict | None], pad_len: int, pad_id: int, num_responses: int) -> dict:
    seqs = [s for e in examples for s in (e["input_ids"] if e else [None] * num_responses)]
    ids, mask = _pad_right(seqs, pad_len, pad_id)
    targets, _ = _pad_right([s for e in examples for s in (e["loss_mask"] if e else [None] * num_responses)],
                            pad_len, 0)
    shape = (len(examples), num_responses, pad_len)
    ranks = np.stack([e["ranks"] if e else np.full(num_responses, -1, np.int32) for e in examples])
    batch = {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
             "loss_mask": (targets * mask).reshape(shape), "ranks": ranks.astype(np.int32)}
    if any(e is not None and "ref_logps" in e for e in examples):  # DPO: precomputed reference log-probs
        batch["ref_logps"] = np.stack([e["ref_logps"] if e else np.zeros(num_responses, np.float32)
                                       for e in examples]).astype(np.float32)
    return batch


def collate_prompts(examples: Sequence[dict | None], pad_len: int, pad_id: int) -> dict:
    ids = np.full((len(examples), pad_len), pad_id, np.int32)
    mask = np.zeros((len(examples), pad_len), np.int32)
    for i, e in enumerate(examples):
        if e is not None and len(e["prompt_ids"]):
            ids[i, -len(e["prompt_ids"]):] = e["prompt_ids"]
            mask[i, -len(e["prompt_ids"]):] = 1
    index = np.asarray([e["index"] if e else -1 for e in examples], np.int32)
    return {"prompt_ids": ids, "prompt_mask": mask, "index": index}
