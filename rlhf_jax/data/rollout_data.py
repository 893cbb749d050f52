"""The RL trainer's data: prompt batches and the PPO-ptx text stream, from files or synthetic.

Each iterator is checkpointable (`get_state` / `set_state`); the loop draws one host batch per
iteration, {"prompts": {prompt_ids, prompt_mask [B, P] left-padded, index [B]}, "ptx": LM batch
or None}, and `place_batch` puts its device part on the mesh.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import generation, sharding
from rlhf_jax.data.dataset import load_split
from rlhf_jax.data.synthetic import SyntheticPrompts, SyntheticText


def make_data(config, workdir: str, tokenizer=None, group_size: int = 1, report: Optional[Callable] = None):
    """(prompt iterator, ptx iterator or None): files through rlhf_jax.data, else synthetic streams.
    The prompt iterator yields rollout.batch_size / group_size prompts (`repeat_prompts` makes
    the group copies). `report(name, split, length_keys)` sees each split read from a file (the
    trainer's data summary)."""
    num_prompts = config.rollout.batch_size // group_size
    pid, nproc = jax.process_index(), jax.process_count()
    cache_dir = config.data.cache_dir or str(pathlib.Path(workdir) / "data")
    stop = generation.stop_ids(config.rollout.eos_id)
    if config.data.prompts:
        split = load_split("prompts", config.data.prompts, tokenizer, max_len=config.rollout.prompt_len,
                                    batch_format="prompts", template=config.data.template, data_dir=cache_dir)
        if report:
            report("prompts", split, "config.rollout.prompt_len")
        split.check_batch_size(config.rollout.batch_size, "config.rollout.batch_size", "prompts", group_size,
                               "config.algorithm.group_size")
        prompts = split.iterator(num_prompts, config.seed)
    else:
        prompts = SyntheticPrompts(num_prompts, config.rollout.prompt_len, config.data.min_prompt_len,
                                   config.model.vocab_size, (config.rollout.pad_id, *stop),
                                   config.seed, pid, nproc)
    ptx = None
    if config.ptx.coef and config.data.ptx:
        split = load_split("text", config.data.ptx, tokenizer, max_len=config.ptx.seq_len, data_dir=cache_dir)
        if report:
            report("ptx", split, "config.ptx.seq_len")
        split.check_batch_size(config.ptx.batch_size, "config.ptx.batch_size")
        ptx = split.iterator(config.ptx.batch_size, config.seed + 1)
    elif config.ptx.coef:
        low = max(config.rollout.pad_id, *stop) + 1
        ptx = SyntheticText(config.ptx.batch_size, config.ptx.seq_len, config.model.vocab_size, low, config.seed,
                            pid, nproc)
    return prompts, ptx


PROMPT_KEYS, PTX_KEYS = ("prompt_ids", "prompt_mask"), ("input_ids", "attention_mask", "loss_mask")


def iteration_batches(prompts: Iterator, ptx: Optional[Iterator], group_size: int = 1) -> Iterator[dict]:
    """Host batches of the loop: {"prompts": prompt batch (with `index`), "ptx": LM batch or None};
    each prompt row repeated `group_size` times in place (a group's rows are consecutive)."""
    while True:
        batch = next(prompts)
        if group_size > 1:
            batch = {key: np.repeat(value, group_size, axis=0) for key, value in batch.items()}
        yield {"prompts": batch, "ptx": None if ptx is None else next(ptx)}


def place_batch(host: Mapping, mesh) -> dict:
    """The device part of a host batch (the prompts' `index` stays on the host for gold scoring)."""
    ptx = host["ptx"]
    return {"prompts": sharding.shard_batch({k: host["prompts"][k] for k in PROMPT_KEYS}, mesh),
            "ptx": None if ptx is None else sharding.shard_batch({k: ptx[k] for k in PTX_KEYS}, mesh)}


def abstract_batch(config, mesh) -> dict:
    """Global ShapeDtypeStructs of one iteration batch, for ahead-of-time compilation."""
    batch_sh = sharding.batch_sharding(mesh)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)  # noqa: E731
    prompts = {k: spec(config.rollout.batch_size, config.rollout.prompt_len) for k in PROMPT_KEYS}
    ptx = {k: spec(config.ptx.batch_size, config.ptx.seq_len) for k in PTX_KEYS} if config.ptx.coef else None
    return {"prompts": prompts, "ptx": ptx}
