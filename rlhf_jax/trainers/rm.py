"""Reward-model trainer (InstructGPT stage 2).

    from rlhf_jax.trainers import rm
    result = rm.train(config, workdir)              # configs/rm.py; resumes from WORKDIR/checkpoints
    model, params, norm = rlhf_jax.load_reward_model(WORKDIR)               # rlhf_jax.loading
    rewards = rlhf_jax.models.reward.score(model, params, norm, input_ids, attention_mask)   # [B]

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

from rlhf_jax import checkpoint, loading, losses, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.models import Transformer
from rlhf_jax.models import reward as reward_lib
from rlhf_jax.trainers import lora_state, loop, ranking_data, setup
from rlhf_jax.trainers import state as state_lib

DATA_KINDS = ranking_data.DATA_KINDS


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
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
        scores = reward_lib.ranking_scores(model, params, batch, rng, deterministic)
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
    loading.check_init(config.init)
    lora_state.validate(config)
    setup.validate_batch("batch_size", config.batch_size, mesh_shape, config.grad_accum, "grad_accum")
    setup.validate_batch("eval.batch_size", config.eval.batch_size, mesh_shape)
    setup.validate_positive(config, ("num_epochs", "log_every", "checkpoint.save_every", "data.max_len",
                                      "grad_accum", "max_nonfinite_streak", "data.builtin_responses"))
    if not isinstance(config.num_steps, int) or config.num_steps < 0:
        raise ValueError(f"config.num_steps={config.num_steps!r} must be >= 0 (0 = num_epochs over the data)")
    ranking_data.validate_data(config)


# ----------------------------------------------------------------------------------------------
# Evaluation and normalisation
# ----------------------------------------------------------------------------------------------
def make_stats_step(model, mesh, param_sh, options: dict | None = None):
    """Jitted sums over one (sharded, global) ranking batch, replicated so every process can read
    them: ranking loss and pairwise accuracy summed over prompts that form pairs (`pairs`), and the
    sum / sum of squares / count of the raw scores of the best (rank 0) responses."""
    def stats(params, batch):
        scores, ranks = reward_lib.ranking_scores(model, params, batch), batch["ranks"]
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
def train(config, workdir: str) -> loop.LoopResult:
    """Run (or resume) reward-model training in `workdir`; returns the loop result.

    The final metrics row also carries `reward_norm/mean` and `reward_norm/std`."""
    mesh = setup.setup_run(config, workdir, validate=functools.partial(validate_config, config), stage="rm")
    options = setup.compiler_options(config)
    loaded = ranking_data.load_data(config, workdir)
    tokenizer, train_split, eval_split, num_steps = loaded.tokenizer, loaded.train, loaded.eval, loaded.num_steps

    # ---- model, optimizer, state (resumed when WORKDIR/checkpoints has one) ------------------------
    model = loading.architecture(config.init, config.model, heads=("value",), vocab_size=len(tokenizer))
    # LoRA (config.lora.rank > 0): adapters + the scalar head trained, the base frozen
    adapted = lora_state.setup(config, model, mesh, options, modules_to_save=("value_head",))
    built = state_lib.build_state(config, adapted.model if adapted else model, mesh, workdir, num_steps, options,
                                  trainable=adapted.trainable if adapted else None)
    lora_state.memory_report(built.state, adapted.frozen if adapted else None)
    full = adapted.full if adapted else (lambda state: state)  # the whole parameter tree, for evaluation
    batches = train_split.iterator(config.batch_size, seed=config.seed)
    if built.resumed is not None:
        batches.set_state(built.meta["data"])

    # ---- jitted step, eval, loop ---------------------------------------------------------------------
    step_kwargs = dict(grad_accum=config.grad_accum, weight_fn=lambda b: prompts_with_pairs(b["ranks"]))
    if adapted is None:
        step_fn = state_lib.make_train_step(make_loss_fn(model), built.optimizer, built.schedule, **step_kwargs)
        train_step = state_lib.jit_train_step(step_fn, built.state_sh, sharding.batch_sharding(mesh), options)
        stats_step = make_stats_step(model, mesh, built.param_sh, options)
    else:
        train_step = lora_state.jit_train_step(adapted, make_loss_fn(adapted.model), built,
                                               sharding.batch_sharding(mesh), options, **step_kwargs)
        stats_step = make_stats_step(adapted.eval_model, mesh, adapted.full_sh, options)
    eval_fn = None
    if eval_split is not None:
        full_eval = make_eval_fn(config, stats_step, eval_split, mesh)
        eval_fn = lambda state: full_eval(full(state))  # noqa: E731
    writer = metrics_lib.MetricWriter(workdir, resume_step=built.resumed)

    def meta_fn(state) -> dict:
        return {"data": batches.get_state(), "model": loading.model_meta(model), "stage": "rm",
                "tokenizer": str(pathlib.Path(workdir, "tokenizer").absolute()),
                "reward_norm": reward_norm(config, stats_step, train_split, mesh, full(state).params),
                **({"lora": adapted.meta} if adapted else {})}

    try:
        result = loop.train_loop(config, state=built.state, step_fn=train_step, batches=batches,
                                 place=lambda batch: sharding.shard_batch(batch, mesh),
                                 checkpointer=built.checkpointer, writer=writer, meta_fn=meta_fn,
                                 items_fn=state_lib.state_items, eval_fn=eval_fn, num_steps=num_steps, desc="rm")
    finally:
        writer.close()
        built.checkpointer.close()
    norm = checkpoint.read_meta(pathlib.Path(workdir) / "checkpoints").get("reward_norm", loading.IDENTITY_NORM)
    if result.last_row:  # this call trained: report the normalisation stored with its final checkpoint
        result.last_row.update({"reward_norm/mean": norm["mean"], "reward_norm/std": norm["std"]})
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / "reward_norm.json").write_text(json.dumps(norm, indent=2) + "\n")
    return result
