"""Reward-model trainer (InstructGPT stage 2) and the reward-model scoring API used by PPO.

    from rlhf_jax.trainers import rm
    result = rm.train(config, workdir)              # configs/rm.py; resumes from WORKDIR/checkpoints
    model, params, norm = rm.load_reward_model(WORKDIR, mesh)
    rewards = rm.score(model, params, norm, input_ids, attention_mask)     # [B], normalised

The RM is the SFT model with the unembedding dropped and a scalar head added; a sequence's score
is the scalar at its last real token. Each ranking batch holds P prompts with K responses
(`[P, K, T]`, rank 0 = best) and the loss is `losses.ranking_loss` (mean over each prompt's
K(K-1)/2 ordered pairs, then over prompts: Ouyang et al. 2022, eq. 1). Evaluation reports the
held-out pairwise accuracy. Normalisation: every checkpoint stores in its metadata
`reward_norm = {"mean", "std"}` of the scores of the best (rank 0) responses of the first
`normalize.num_batches` training batches, so that `score` = (raw - mean) / std has mean 0 on
reference responses (std is 1 unless normalize.scale).
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, losses, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.models import Transformer, last_token_values
from rlhf_jax.trainers import common, sft

DATA_KINDS = ("rankings", "comparisons", "hh")
IDENTITY_NORM = {"mean": 0.0, "std": 1.0}


# ----------------------------------------------------------------------------------------------
# Scoring (also the API for PPO and the pipeline)
# ----------------------------------------------------------------------------------------------
def raw_scores(model: Transformer, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Unnormalised reward `[B]`: the value head at the last real token of each right-padded row."""
    values = model.apply({"params": params}, input_ids, attention_mask).values
    return last_token_values(values, attention_mask)


def score(model: Transformer, params, norm, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Normalised reward `[B]` = (raw - norm["mean"]) / norm["std"] (traceable; jit it as needed)."""
    return (raw_scores(model, params, input_ids, attention_mask) - norm["mean"]) / norm["std"]


def load_reward_model(path: str, mesh, rules=sharding.DEFAULT_RULES):
    """(model, params on `mesh`, norm) from an RM run (workdir, checkpoints/ dir or step dir)."""
    model, params = common.load_stage_model(path, mesh, rules)
    if "value" not in model.heads:
        raise ValueError(f"{path}: not a reward-model checkpoint (its model heads are {model.heads})")
    return model, params, dict(checkpoint.read_meta(path).get("reward_norm", IDENTITY_NORM))


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def flat_scores(model: Transformer, params, batch, rng=None, deterministic: bool = True) -> jax.Array:
    """Raw scores `[P, K]` of a ranking batch (`[P, K, T]` flattened to `[P*K, T]` for the model)."""
    num_prompts, k, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(num_prompts * k, length)
    mask = batch["attention_mask"].reshape(num_prompts * k, length)
    values = model.apply({"params": params}, ids, mask, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng}).values
    return last_token_values(values, mask).reshape(num_prompts, k)


def prompts_with_pairs(ranks: jax.Array) -> jax.Array:
    """Prompts that form at least one ordered pair (present responses with different ranks):
    the denominator of `ranking_loss`, so accumulation weighs microbatches exactly."""
    present = ranks >= 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    return jnp.sum(jnp.any(better, axis=(1, 2)))


def make_loss_fn(model: Transformer):
    """loss_fn(params, batch, rng) -> (ranking loss, {"accuracy", "score/mean", "score/std"})."""
    deterministic = model.config.dropout_rate == 0.0

    def loss_fn(params, batch, rng):
        scores = flat_scores(model, params, batch, rng, deterministic)
        present = (batch["ranks"] >= 0).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(present), 1.0)
        mean = jnp.sum(scores * present) / count
        std = jnp.sqrt(jnp.sum(jnp.square(scores - mean) * present) / count)
        metrics = {"accuracy": losses.ranking_accuracy(scores, batch["ranks"]), "score/mean": mean,
                   "score/std": std}
        return losses.ranking_loss(scores, batch["ranks"]), metrics
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def validate_config(config, mesh_shape: tuple[int, int, int]) -> None:
    """One-line errors naming the key, raised before any data is read or compiled."""
    common.validate_init(config.init, "rm", ("scratch", "checkpoint", "hf"))
    common.validate_batch("batch_size", config.batch_size, mesh_shape, config.grad_accum, "grad_accum")
    common.validate_batch("eval.batch_size", config.eval.batch_size, mesh_shape)
    common.validate_positive(config, ("num_epochs", "log_every", "checkpoint.save_every", "data.max_len",
                                      "grad_accum", "max_nonfinite_streak", "data.builtin_responses"))
    if not isinstance(config.num_steps, int) or config.num_steps < 0:
        raise ValueError(f"config.num_steps={config.num_steps!r} must be >= 0 (0 = num_epochs over the data)")
    if config.data.kind not in DATA_KINDS:
        raise ValueError(f"config.data.kind={config.data.kind!r} (allowed: {', '.join(map(repr, DATA_KINDS))})")
    if config.data.builtin_responses < 2:
        raise ValueError(f"config.data.builtin_responses={config.data.builtin_responses} must be >= 2")
    common.validate_paths(config.data, ("train", "eval", "tokenizer"))


def builtin_rankings(workdir: str, config) -> dict:
    """Rankings from the built-in task (written once into WORKDIR/task): per prompt, K imperfect
    demonstrations (wrong w.p. builtin_error_rate, chatty w.p. 0.3) ranked by a simulated labeler
    from their gold scores. Returns the task files plus "rm_train" / "rm_eval"."""
    from rlhf_jax import tasks

    files = sft.builtin_task(workdir, config.seed)
    out = pathlib.Path(workdir) / "task"
    d = config.data
    for name, split, count in (("rm_train", "train", d.builtin_prompts), ("rm_eval", "heldout",
                                                                           max(d.builtin_prompts // 4, 1))):
        path = out / f"{name}_k{d.builtin_responses}.jsonl"
        files[name] = str(path)
        if path.exists() or jax.process_index() != 0:
            continue
        rng = np.random.default_rng([config.seed, 7, split == "train"])
        examples = tasks.sample_examples(count, seed=config.seed + 1000, split=split)
        responses = [[tasks.demonstration(e, rng, error_rate=d.builtin_error_rate) for _ in range(d.builtin_responses)]
                     for e in examples]
        records = tasks.collect_rankings(examples, responses, rng, temperature=d.builtin_labeler_temperature)
        tmp = path.with_suffix(".tmp")
        tasks.write_rankings(tmp, records)
        tmp.rename(path)
    return files


def resolve_data(config, workdir: str) -> sft.DataFiles:
    data = config.data
    if data.train:
        return sft.DataFiles(train=[p.strip() for p in data.train.split(",") if p.strip()],
                             eval=data.eval or None, tokenizer=common.tokenizer_path(config))
    task = builtin_rankings(workdir, config)
    return sft.DataFiles(train=[task["rm_train"]], eval=data.eval or task["rm_eval"],
                         tokenizer=common.tokenizer_path(config, task))


def load_ranking_split(config, files, tokenizer, workdir: str):
    from rlhf_jax import data

    return data.load_split(config.data.kind, files, tokenizer, max_len=config.data.max_len,
                           max_prompt_len=config.data.max_prompt_len or None, batch_format="ranking",
                           template=config.data.template, data_dir=config.data.cache_dir or f"{workdir}/data")


# ----------------------------------------------------------------------------------------------
# Evaluation and normalisation
# ----------------------------------------------------------------------------------------------
def make_stats_step(model, mesh, param_sh, options: dict | None = None):
    """Jitted sums over one (sharded, global) ranking batch, replicated so every process can read
    them: ranking loss and pairwise accuracy summed over prompts that form pairs (`pairs`), and the
    sum / sum of squares / count of the raw scores of the best (rank 0) responses."""
    def stats(params, batch):
        scores, ranks = flat_scores(model, params, batch), batch["ranks"]
        pairs = prompts_with_pairs(ranks).astype(jnp.float32)
        best = (ranks == 0).astype(jnp.float32)
        return {"loss_sum": losses.ranking_loss(scores, ranks) * pairs,
                "accuracy_sum": losses.ranking_accuracy(scores, ranks) * pairs, "pairs": pairs,
                "best_sum": jnp.sum(scores * best), "best_sumsq": jnp.sum(jnp.square(scores) * best),
                "best_count": jnp.sum(best)}
    return jax.jit(stats, in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh), compiler_options=options)


def summed_stats(stats_step, params, batches, num_batches: int, mesh) -> dict:
    """`stats_step` sums over the first `num_batches` batches (0 = all) of an iterator."""
    totals: dict = {}
    for i, batch in enumerate(batches):
        if num_batches and i >= num_batches:
            break
        sums = jax.device_get(stats_step(params, sharding.shard_batch(batch, mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return totals


def make_eval_fn(config, stats_step, eval_split, mesh):
    """eval_fn(state) -> {"eval/loss", "eval/accuracy"}: held-out ranking loss and pairwise
    accuracy (per-prompt means, averaged over prompts that form pairs)."""
    def eval_fn(state) -> dict:
        batches = eval_split.iterator(config.eval.batch_size, seed=0, shuffle=False, drop_remainder=False,
                                      num_epochs=1)
        totals = summed_stats(stats_step, state.params, batches, config.eval.num_batches, mesh)
        pairs = max(totals["pairs"], 1.0)
        return {"eval/loss": totals["loss_sum"] / pairs, "eval/accuracy": totals["accuracy_sum"] / pairs}
    return eval_fn


def reward_norm(config, stats_step, train_split, mesh, params) -> dict:
    """{"mean", "std"} of raw scores of the best (rank 0) responses of the first
    normalize.num_batches training batches (fixed file order, independent of training progress)."""
    batches = train_split.iterator(config.batch_size, seed=config.seed, shuffle=False, drop_remainder=True,
                                   num_epochs=1)
    totals = summed_stats(stats_step, params, batches, config.normalize.num_batches, mesh)
    count = max(totals["best_count"], 1.0)
    mean = totals["best_sum"] / count
    std = float(np.sqrt(max(totals["best_sumsq"] / count - mean * mean, 0.0))) if config.normalize.scale else 1.0
    return {"mean": mean, "std": max(std, 1e-6), "num_responses": int(totals["best_count"])}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(config, workdir: str) -> common.LoopResult:
    """Run (or resume) reward-model training in `workdir`; returns the loop result.

    The final metrics row also carries `reward_norm/mean` and `reward_norm/std`."""
    mesh = common.setup_run(config, workdir, validate=functools.partial(validate_config, config))
    files = resolve_data(config, workdir)
    tokenizer = common.load_tokenizer(files.tokenizer)
    common.save_tokenizer(tokenizer, workdir)
    train_split = load_ranking_split(config, files.train, tokenizer, workdir)
    eval_split = load_ranking_split(config, files.eval, tokenizer, workdir) if files.eval else None
    num_steps = config.num_steps or config.num_epochs * (len(train_split) // config.batch_size)
    if num_steps <= 0:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {len(train_split)} training "
                         f"prompts: an epoch has no step")

    # ---- model, optimizer, state (resumed when WORKDIR/checkpoints has one) ------------------------
    model = common.architecture(config, heads=("value",), vocab_size=len(tokenizer))
    common.check_vocab(model, tokenizer)
    setup = common.build_state(config, model, mesh, workdir, num_steps)
    batches = train_split.iterator(config.batch_size, seed=config.seed)
    if setup.resumed is not None:
        batches.set_state(setup.meta["data"])

    # ---- jitted step, eval, loop ---------------------------------------------------------------------
    step_fn = common.make_train_step(make_loss_fn(model), setup.optimizer, setup.schedule,
                                     grad_accum=config.grad_accum, weight_fn=lambda b: prompts_with_pairs(b["ranks"]))
    train_step = common.jit_train_step(step_fn, setup.state_sh, sharding.batch_sharding(mesh),
                                       common.compiler_options(config))
    stats_step = make_stats_step(model, mesh, setup.param_sh, common.compiler_options(config))
    eval_fn = make_eval_fn(config, stats_step, eval_split, mesh) if eval_split is not None else None
    writer = metrics_lib.MetricWriter(workdir, resume_step=setup.resumed)

    def meta_fn(state) -> dict:
        return {"data": batches.get_state(), "model": common.model_meta(model), "stage": "rm",
                "tokenizer": str(pathlib.Path(workdir, "tokenizer").absolute()),
                "reward_norm": reward_norm(config, stats_step, train_split, mesh, state.params)}

    try:
        result = common.train_loop(config, state=setup.state, train_step=train_step, batches=batches, mesh=mesh,
                                   checkpointer=setup.checkpointer, writer=writer, meta_fn=meta_fn, eval_fn=eval_fn,
                                   num_steps=num_steps, desc="rm")
    finally:
        writer.close()
        setup.checkpointer.close()
    norm = checkpoint.read_meta(pathlib.Path(workdir) / "checkpoints").get("reward_norm", IDENTITY_NORM)
    if result.last_row:  # this call trained: report the normalisation stored with its final checkpoint
        result.last_row.update({"reward_norm/mean": norm["mean"], "reward_norm/std": norm["std"]})
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / "reward_norm.json").write_text(json.dumps(norm, indent=2) + "\n")
    return result
