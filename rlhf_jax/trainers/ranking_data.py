"""Ranking data shared by the trainers that learn from preferences (RM, DPO): which files (the
config's, else rankings built from the built-in task), their checks, and the tokenized split
(`[P, K, T]` ranking batches, see rlhf_jax/data/batching.py)."""
from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax import loading, tasks
from rlhf_jax.trainers import setup

DATA_KINDS = ("rankings", "comparisons", "hh")


def validate_data(config) -> None:
    """One-line errors naming the config.data key (kind, built-in responses, paths)."""
    if config.data.kind not in DATA_KINDS:
        raise ValueError(f"config.data.kind={config.data.kind!r} (allowed: {', '.join(map(repr, DATA_KINDS))})")
    if not isinstance(config.data.builtin_responses, int) or config.data.builtin_responses < 2:
        raise ValueError(f"config.data.builtin_responses={config.data.builtin_responses!r} must be an integer >= 2")
    setup.validate_paths(config.data, ("train", "eval", "tokenizer"))


def resolve_data(config, workdir: str) -> setup.DataFiles:
    """Training/eval files and tokenizer: the config's, else the built-in task's rankings."""
    data = config.data
    if data.train:
        return setup.DataFiles(train=[p.strip() for p in data.train.split(",") if p.strip()], eval=data.eval or None,
                               tokenizer=loading.tokenizer_path(data.tokenizer, config.init))
    task = tasks.builtin_rankings(workdir, config.seed, data.builtin_prompts, data.builtin_responses,
                                  data.builtin_error_rate, data.builtin_labeler_temperature)
    return setup.DataFiles(train=[task["rm_train"]], eval=data.eval or task["rm_eval"],
                           tokenizer=loading.tokenizer_path(data.tokenizer, config.init, task))


def load_ranking_split(config, files, tokenizer, workdir: str):
    """The tokenized ranking split of `files` (config.data: kind, max_len, max_prompt_len, template,
    cache_dir; "" cache = WORKDIR/data)."""
    from rlhf_jax import data

    return data.load_split(config.data.kind, files, tokenizer, max_len=config.data.max_len,
                           max_prompt_len=config.data.max_prompt_len or None, batch_format="ranking",
                           template=config.data.template, data_dir=config.data.cache_dir or f"{workdir}/data")


@dataclasses.dataclass
class RankingData:
    """A preference stage's tokenizer (also saved to WORKDIR/tokenizer), splits and step count."""

    tokenizer: Any
    train: Any  # data.TokenizedSplit of ranking examples
    eval: Any  # the held-out split, or None
    num_steps: int  # config.num_steps, or num_epochs passes over the training prompts


def load_data(config, workdir: str) -> RankingData:
    """Resolve, check the tokenizer against the model's vocabulary (`loading.check_vocab`), tokenize and
    count: raises a config.batch_size error when an epoch would have no step
    (`TokenizedSplit.check_batch_size`); all before any weights are built."""
    files = resolve_data(config, workdir)
    tokenizer = loading.load_tokenizer(files.tokenizer)
    model = loading.architecture(config.init, config.model, heads=("lm",), vocab_size=len(tokenizer))
    loading.check_vocab(model, tokenizer, config.init, tokenizer_setting=config.data.tokenizer)  # before tokenizing
    loading.save_tokenizer(tokenizer, workdir)
    train_split = load_ranking_split(config, files.train, tokenizer, workdir)
    eval_split = load_ranking_split(config, files.eval, tokenizer, workdir) if files.eval else None
    for name, split in (("train", train_split), ("eval", eval_split)):
        if split is not None:
            setup.report_data(workdir, name, split, ("config.data.max_len", "config.data.max_prompt_len"))
    train_split.check_batch_size(config.batch_size, "config.batch_size", "ranked prompts")
    num_steps = config.num_steps or config.num_epochs * (len(train_split) // config.batch_size)
    return RankingData(tokenizer, train_split, eval_split, num_steps)
