"""Direct preference optimisation trainer: DPO, cDPO, IPO, SimPO on the RM's ranking data.

    from rlhf_jax.trainers import dpo
    result = dpo.train(config, workdir)          # configs/dpo.py; resumes from WORKDIR/checkpoints
    model, params = rlhf_jax.loading.load_model(WORKDIR, heads=("lm",))          # the trained policy

The policy starts from config.init (an SFT run); the frozen reference is that same starting model,
or the checkpoint at config.dpo.reference_path (online DPO: later rounds start from the previous
round's policy and keep the SFT model as reference).
Each ranking batch holds P prompts with K responses (`[P, K, T]`, rank 0 = best; comparisons and
HH-RLHF rows are K = 2), and every ordered pair of a prompt (K(K-1)/2 of them, ties skipped) is one
DPO pair. A response's log-prob is the teacher-forced sum over its response tokens only (prompt and
padding excluded: `preference.sequence_logps`). The loss is `losses.dpo_pair_losses` averaged over
the valid pairs of the batch (gradient accumulation weighs microbatches by their pairs). Log-prob
form by loss type (`preference.LOGP_FORM`): sigmoid (DPO, cDPO) summed, IPO length-averaged (as
TRL), SimPO summed with the response lengths (the loss divides by them). Reference log-probs are
computed inside each jitted step from the frozen reference parameters (`dpo.reference="in_step"`),
or once for the whole training set before step 1 (`"precompute"`, single process); SimPO has no
reference. Metrics: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margin`,
`rewards/accuracy` (a zero margin counts 1/2, as the RM counts ties), `logps/chosen`,
`logps/rejected` (the form the loss gets), and `eval/` versions on the held-out rankings.

LoRA (`config.lora.rank > 0`; QLoRA with `config.lora.quantize`): the state holds the adapters
(and `modules_to_save`) only, as in SFT (`trainers.lora_state`). The reference is the policy with its
adapters off: `lora.base_model` on the frozen base the policy reads (the fp32 or quantised kernels,
plus the starting values of any `modules_to_save`), with no second copy of the base; a
`dpo.reference_path` reference is read as a separate plain model.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import loading, lora, preference, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.rl import masked_mean, masked_sum
from rlhf_jax.trainers import lora_state, loop, ranking_data, setup
from rlhf_jax.trainers import state as state_lib

REFERENCE_MODES = ("in_step", "precompute")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def loss_settings(config) -> dict:
    """`preference.resolve_variant` of config.dpo for config.variant (default "dpo")."""
    return preference.resolve_variant(config.dpo, config.get("variant", "dpo"))


def validate_config(config, mesh_shape: tuple[int, int, int]) -> None:
    """One-line errors naming the key, raised before any data is read or compiled."""
    loading.check_init(config.init)
    setup.validate_batch("batch_size", config.batch_size, mesh_shape, config.grad_accum, "grad_accum")
    setup.validate_batch("eval.batch_size", config.eval.batch_size, mesh_shape)
    setup.validate_positive(config, ("num_epochs", "log_every", "checkpoint.save_every", "data.max_len",
                                      "grad_accum", "max_nonfinite_streak"))
    if not isinstance(config.num_steps, int) or config.num_steps < 0:
        raise ValueError(f"config.num_steps={config.num_steps!r} must be >= 0 (0 = num_epochs over the data)")
    ranking_data.validate_data(config)
    loss_settings(config)
    if config.dpo.reference not in REFERENCE_MODES:
        raise ValueError(f"config.dpo.reference={config.dpo.reference!r} (allowed: "
                         f"{', '.join(map(repr, REFERENCE_MODES))})")
    setup.validate_paths(config.dpo, ("reference_path",), prefix="config.dpo")
    lora_state.validate(config)
    if config.dpo.reference == "precompute" and jax.process_count() > 1:
        raise ValueError("config.dpo.reference='precompute' runs on one process; use 'in_step' with several")


# ----------------------------------------------------------------------------------------------
# Loss, reference log-probs, evaluation sums
# ----------------------------------------------------------------------------------------------
def batch_pairs(model, settings: dict, params, batch, *, rng=None, deterministic: bool = True):
    """Per-pair losses, aux and valid mask `[P, M]` of a ranking batch (`batch["ref_logps"] [P, K]`
    when the loss needs a reference)."""
    logps, lengths = preference.ranking_logps(model, params, batch, rng=rng, deterministic=deterministic)
    ref = batch["ref_logps"] if settings["loss_type"] != "simpo" else jnp.zeros_like(logps)
    return preference.ranking_pair_losses(logps, ref, lengths, batch["ranks"], settings)


def make_loss_fn(model, settings: dict):
    """loss_fn(params, batch, rng) -> (mean loss over valid pairs, the METRICS means)."""
    deterministic = model.config.dropout_rate == 0.0

    def loss_fn(params, batch, rng):
        pair_losses, aux, valid = batch_pairs(model, settings, params, batch, rng=rng, deterministic=deterministic)
        return masked_mean(pair_losses, valid), {k: masked_mean(aux[k], valid) for k in METRICS}
    return loss_fn


def valid_pairs(batch) -> jax.Array:
    """Number of DPO pairs in a ranking batch (the weight of a microbatch)."""
    return jnp.sum(preference.ordered_pairs(batch["ranks"])[2])


def with_reference(model, ref_params, batch) -> dict:
    """The batch plus `ref_logps [P, K]`: summed response log-probs under the frozen reference."""
    ref_logps, _ = preference.ranking_logps(model, ref_params, batch)
    return {**batch, "ref_logps": jax.lax.stop_gradient(ref_logps)}


def make_step(model, settings: dict, built: state_lib.StageState, config, mesh, reference, options,
              adapted: lora_state.LoraStage | None = None):
    """The loop's `step(state, batch)`: the guarded train step, with reference log-probs added inside
    the same jitted program (in_step) or read from the batch (precompute, SimPO). `reference`:
    (ref_model, ref_params) or None; `adapted`: the LoRA view (the policy is then
    `adapted.model` on `combine(state.params, adapted.frozen)`, the frozen base an argument)."""
    ref_model, ref_params = reference if reference and config.dpo.reference == "in_step" else (None, None)
    policy, frozen = (adapted.model, adapted.frozen) if adapted else (model, None)
    loss_fn = make_loss_fn(policy, settings)

    def step(state, batch, ref, frozen):
        fn = loss_fn if frozen is None else lambda p, b, rng: loss_fn(lora.combine(p, frozen), b, rng)  # noqa: E731
        train = state_lib.make_train_step(fn, built.optimizer, built.schedule, grad_accum=config.grad_accum,
                                          weight_fn=valid_pairs)
        return train(state, batch if ref is None else with_reference(ref_model, ref, batch))

    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(built.state_sh, batch_sh, shardings_of(ref_params), shardings_of(frozen)),
                     out_shardings=(built.state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                     compiler_options=options)
    return lambda state, batch: jitted(state, batch, ref_params, frozen)


def shardings_of(tree):
    """The shardings of a pytree of placed arrays (None for None: an absent argument)."""
    return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def make_stats_step(model, settings: dict, mesh, param_sh, options=None, ref_model=None, ref_sh=None):
    """Jitted sums over one ranking batch (replicated): loss and METRICS summed over valid pairs, and
    `pairs`. The reference log-probs (`ref_model`, default `model`, on `ref_sh`, default `param_sh`)
    are computed in the same program (none for SimPO)."""
    ref_model = model if ref_model is None else ref_model

    def stats(params, ref_params, batch):
        if ref_params is not None:
            batch = with_reference(ref_model, ref_params, batch)
        pair_losses, aux, valid = batch_pairs(model, settings, params, batch)
        sums = {f"{k}_sum": masked_sum(aux[k], valid) for k in METRICS}
        return {**sums, "loss_sum": masked_sum(pair_losses, valid), "pairs": jnp.sum(valid)}
    if settings["loss_type"] == "simpo":  # SimPO: ref_params is None
        ref_sh = None
    elif ref_sh is None:
        ref_sh = param_sh
    return jax.jit(stats, in_shardings=(param_sh, ref_sh, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh), compiler_options=options)


def make_eval_fn(config, stats_step, eval_split, mesh, ref_params):
    """eval_fn(state) -> {"eval/loss", "eval/rewards/...", "eval/logps/..."}: means over the held-out
    pairs (the first eval.num_batches batches; 0 = all)."""
    def eval_fn(state) -> dict:
        batches = eval_split.iterator(config.eval.batch_size, seed=0, shuffle=False, drop_remainder=False,
                                      num_epochs=1)
        totals: dict = {}
        for i, batch in enumerate(batches):
            if config.eval.num_batches and i >= config.eval.num_batches:
                break
            sums = jax.device_get(stats_step(state.params, ref_params, sharding.shard_batch(batch, mesh)))
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
        pairs = max(totals["pairs"], 1.0)
        return {f"eval/{k}": totals[f"{k}_sum"] / pairs for k in ("loss", *METRICS)}
    return eval_fn


def reference_of(config, model, mesh, adapted: lora_state.LoraStage | None, options=None):
    """(ref_model, ref_params) of the frozen reference: the starting weights read again (the state may
    be resumed) or `dpo.reference_path`'s; with LoRA and no reference_path, the adapter-free policy
    (`lora.base_model` on the frozen base + the starting `modules_to_save`: no copy of the base)."""
    if adapted is not None and not config.dpo.reference_path:
        return lora.base_model(model, adapted.spec), lora.combine(adapted.initial_saved, adapted.frozen)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # as build_state: same fresh init
    ref_init, key = config.init, "config.init"
    if config.dpo.reference_path:
        ref_init = ml_collections.ConfigDict({"source": "checkpoint", "path": config.dpo.reference_path})
        key = "config.dpo.reference"
        check_same_architecture(model, config.dpo.reference_path)
    param_sh = sharding.param_shardings(model, mesh)
    return model, loading.initial_params(ref_init, model, param_sh, init_rng, options, key=key)


def check_same_architecture(model, reference_path: str) -> None:
    """One-line ValueError naming config.dpo.reference_path when its model is not the policy's
    architecture (vocabulary, widths, layers, ...; the runtime dtype / remat / dropout aside)."""
    saved = loading.model_from_meta(loading.stage_meta(reference_path, "config.dpo.reference_path")["model"]).config
    runtime = {k: getattr(model.config, k) for k in loading.RUNTIME_FIELDS}
    differ = {f.name: (getattr(saved, f.name), getattr(model.config, f.name))
              for f in dataclasses.fields(saved) if f.name not in runtime
              and getattr(saved, f.name) != getattr(model.config, f.name)}
    if differ:
        raise ValueError(f"config.dpo.reference_path={reference_path!r} holds another architecture than the policy: "
                         + ", ".join(f"{k}={a} (policy {b})" for k, (a, b) in differ.items())
                         + "; the reference must be a checkpoint of the policy's model")


def precompute_reference(model, ref_params, param_sh, split, batch_size: int, mesh, options=None) -> None:
    """Attach `ref_logps [K]` (summed response log-probs under the reference) to every example of
    `split`, in batches of `batch_size` prompts; later batches of the split then carry `ref_logps`."""
    fn = jax.jit(lambda params, batch: preference.ranking_logps(model, params, batch)[0],
                 in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), compiler_options=options)
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, start + batch_size)
        rows[rows >= len(split)] = -1
        host = split.collate(rows)
        host.pop("ref_logps", None)
        out = np.asarray(jax.device_get(fn(ref_params, sharding.shard_batch(host, mesh))), np.float32)
        for i, row in enumerate(rows):
            if row >= 0:
                split.examples[row]["ref_logps"] = out[i]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(config, workdir: str) -> loop.LoopResult:
    """Run (or resume) DPO-family training in `workdir`; returns the loop result."""
    mesh = setup.setup_run(config, workdir, validate=functools.partial(validate_config, config), stage="dpo")
    options = setup.compiler_options(config)
    settings = loss_settings(config)
    loaded = ranking_data.load_data(config, workdir)
    tokenizer, train_split, eval_split, num_steps = loaded.tokenizer, loaded.train, loaded.eval, loaded.num_steps

    # ---- policy state (resumed when WORKDIR/checkpoints has one), frozen reference ------------------
    model = loading.architecture(config.init, config.model, heads=("lm",), vocab_size=len(tokenizer))
    adapted = lora_state.setup(config, model, mesh, options, keep_initial=True)  # None unless config.lora.rank > 0
    built = state_lib.build_state(config, adapted.model if adapted else model, mesh, workdir, num_steps, options,
                                  trainable=adapted.trainable if adapted else None)
    lora_state.memory_report(built.state, adapted.frozen if adapted else None)
    reference = None
    if settings["loss_type"] != "simpo":
        reference = reference_of(config, model, mesh, adapted, options)
        if config.dpo.reference == "precompute":
            precompute_reference(*reference, shardings_of(reference[1]), train_split, config.eval.batch_size, mesh,
                                 options)
    batches = train_split.iterator(config.batch_size, seed=config.seed)
    if built.resumed is not None:
        batches.set_state(built.meta["data"])

    # ---- jitted step, eval, loop ----------------------------------------------------------------------
    train_step = make_step(model, settings, built, config, mesh, reference, options, adapted)
    eval_fn = None
    if eval_split is not None:
        ref_model, ref_params = reference or (None, None)
        if adapted is None:
            stats_step = make_stats_step(model, settings, mesh, built.param_sh, options, ref_model,
                                         shardings_of(ref_params))
            eval_fn = make_eval_fn(config, stats_step, eval_split, mesh, ref_params)
        else:
            stats_step = make_stats_step(adapted.eval_model, settings, mesh, adapted.full_sh, options, ref_model,
                                         shardings_of(ref_params))
            full_eval = make_eval_fn(config, stats_step, eval_split, mesh, ref_params)
            eval_fn = lambda state: full_eval(adapted.full(state))  # noqa: E731
    writer = metrics_lib.MetricWriter(workdir, resume_step=built.resumed)
    meta_fn = lambda state: {"data": batches.get_state(), "model": loading.model_meta(model),  # noqa: E731
                             "tokenizer": str(pathlib.Path(workdir, "tokenizer").absolute()), "stage": "dpo",
                             "dpo": settings, **({"lora": adapted.meta} if adapted else {})}
    try:
        result = loop.train_loop(config, state=built.state, step_fn=train_step, batches=batches,
                                 place=lambda batch: sharding.shard_batch(batch, mesh),
                                 checkpointer=built.checkpointer, writer=writer, meta_fn=meta_fn,
                                 items_fn=state_lib.state_items, eval_fn=eval_fn, num_steps=num_steps,
                                 desc=config.get("variant", "dpo"))
    finally:
        writer.close()
        built.checkpointer.close()
    return result
