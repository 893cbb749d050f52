"""SFT trainer (InstructGPT stage 1), also used for pretraining (loss on every token).

    from rlhf_jax.trainers import sft
    result = sft.train(config, workdir)    # configs/sft.py; resumes from WORKDIR/checkpoints

Loss: token-mean next-token NLL over the targets of `loss_mask` (responses for demonstrations,
every token for a text corpus): `rlhf_jax.losses.lm_loss`. Gradient accumulation weighs each
microbatch by its number of target tokens, so it equals one big batch. Evaluation: the same loss
on the held-out file, plus greedy/temperature samples of a few held-out prompts written to
WORKDIR/samples.jsonl. Checkpoints hold the params, optimizer state, step, RNG and data position;
their metadata describes the model and tokenizer so the RM and PPO stages can load it.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import loading, losses, sharding, tasks
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.trainers import lora_state, loop, setup
from rlhf_jax.trainers import state as state_lib

DATA_KINDS = ("demonstrations", "text", "comparisons", "rankings", "hh")


# ----------------------------------------------------------------------------------------------
# Config checks (before anything is compiled) and data
# ----------------------------------------------------------------------------------------------
def validate_config(config, mesh_shape: tuple[int, int, int]) -> None:
    """One-line errors naming the key, raised before any data is read or compiled."""
    loading.check_init(config.init)
    lora_state.validate(config)
    setup.validate_batch("batch_size", config.batch_size, mesh_shape, config.grad_accum, "grad_accum")
    setup.validate_batch("eval.batch_size", config.eval.batch_size, mesh_shape)
    setup.validate_positive(config, ("num_steps", "log_every", "checkpoint.save_every", "data.max_len",
                                      "grad_accum", "max_nonfinite_streak"))
    if config.data.kind not in DATA_KINDS:
        raise ValueError(f"config.data.kind={config.data.kind!r} (allowed: {', '.join(map(repr, DATA_KINDS))})")
    if config.data.text_separator not in ("blank_line", "line"):
        raise ValueError(f"config.data.text_separator={config.data.text_separator!r} (allowed: 'blank_line', 'line')")
    setup.validate_paths(config.data, ("train", "eval", "tokenizer"))


def resolve_data(config, workdir: str) -> setup.DataFiles:
    """Training/eval files and tokenizer: the config's, else the built-in task's (see configs/sft.py)."""
    data = config.data
    task = tasks.builtin_task(workdir, config.seed) if not data.train else None
    if task:
        train = [task["corpus"] if data.kind == "text" else task["sft"]]
        eval_file = data.eval or (None if data.kind == "text" else task["sft_eval"])
    else:
        train, eval_file = [p.strip() for p in data.train.split(",") if p.strip()], data.eval or None
    tokenizer = loading.tokenizer_path(data.tokenizer, config.init, task)
    return setup.DataFiles(train=train, eval=eval_file, tokenizer=tokenizer)


LENGTH_KEYS = ("config.data.max_len", "config.data.max_prompt_len")  # the data summary's budgets (report_data)


def load_lm_split(config, files, tokenizer, workdir: str, batch_format: str = "lm"):
    from rlhf_jax import data

    max_prompt_len = config.data.max_prompt_len or None
    if batch_format == "prompts":
        max_prompt_len = max_prompt_len or config.data.max_len // 2
    return data.load_split(config.data.kind, files, tokenizer, max_len=config.data.max_len,
                           max_prompt_len=max_prompt_len, batch_format=batch_format,
                           template=config.data.template, data_dir=config.data.cache_dir or f"{workdir}/data",
                           text_separator=config.data.text_separator)


# ----------------------------------------------------------------------------------------------
# Loss and evaluation
# ----------------------------------------------------------------------------------------------
def make_loss_fn(model):
    """loss_fn(params, batch, rng) -> (token-mean NLL, {"accuracy"}); dropout when configured."""
    deterministic = model.config.dropout_rate == 0.0

    def loss_fn(params, batch, rng):
        out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
        loss, aux = losses.lm_loss(out.logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"accuracy": aux["accuracy"]}
    return loss_fn


def target_tokens(batch) -> jax.Array:
    """Number of predicted tokens in a batch (loss_mask without its first column)."""
    return jnp.sum(batch["loss_mask"][..., 1:])


def make_eval_fn(config, model, eval_split, prompt_split, tokenizer, mesh, param_sh, workdir: str, writer=None):
    """eval_fn(state) -> {"eval/loss", "eval/accuracy"} over held-out batches; also writes samples
    (samples.jsonl, and as TensorBoard text through `writer`)."""
    loss_fn = make_loss_fn(model.clone(config=model.config.replace(dropout_rate=0.0)))

    @functools.partial(jax.jit, in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                       out_shardings=sharding.replicated(mesh), compiler_options=setup.compiler_options(config))
    def eval_step(params, batch):  # replicated sums over the global batch: readable on every process
        loss, aux = loss_fn(params, batch, None)
        tokens = target_tokens(batch)
        return {"loss_sum": loss * tokens, "hits": aux["accuracy"] * tokens, "tokens": tokens}

    def eval_fn(state) -> dict:
        out = {}
        if eval_split is not None:
            batches = eval_split.iterator(config.eval.batch_size, seed=0, shuffle=False, drop_remainder=False,
                                          num_epochs=1)
            totals = {"loss_sum": 0.0, "hits": 0.0, "tokens": 0.0}
            for i, batch in enumerate(batches):
                if config.eval.num_batches and i >= config.eval.num_batches:
                    break
                sums = jax.device_get(eval_step(state.params, sharding.shard_batch(batch, mesh)))
                totals = {k: totals[k] + float(sums[k]) for k in totals}
            tokens = max(totals["tokens"], 1.0)
            out = {"eval/loss": totals["loss_sum"] / tokens, "eval/accuracy": totals["hits"] / tokens}
        if prompt_split is not None and jax.process_count() == 1:  # samples: single-process runs only
            write_samples(config, model, state, prompt_split, tokenizer, workdir, writer)
        return out

    return eval_fn


def write_samples(config, model, state, prompt_split, tokenizer, workdir: str, writer=None) -> None:
    """Sample the first eval.num_samples held-out prompts; append them to WORKDIR/samples.jsonl and
    show them as TensorBoard text `samples` (a `metrics.MetricWriter`)."""
    from rlhf_jax import generation
    from rlhf_jax.data import chat

    step = int(jax.device_get(state.step))
    batch = prompt_split.collate(np.arange(min(config.eval.num_samples, len(prompt_split))))
    gen = generation.generate(model, state.params, batch["prompt_ids"], batch["prompt_mask"],
                              jax.random.fold_in(jax.random.PRNGKey(config.seed), step),
                              max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
                              eos_id=chat.stop_ids(tokenizer), pad_id=chat.pad_id(tokenizer))
    tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
    if jax.process_index() != 0:
        return
    records = []
    with open(pathlib.Path(workdir) / "samples.jsonl", "a") as f:
        for row in range(tokens.shape[0]):
            prompt = batch["prompt_ids"][row][batch["prompt_mask"][row] > 0]
            response = tokens[row][mask[row] > 0]
            records.append({"step": step, "prompt": tokenizer.decode(prompt), "response": tokenizer.decode(response)})
            f.write(json.dumps(records[-1]) + "\n")
    logging.info("sample @%d: %s -> %s", step, records[0]["prompt"], records[0]["response"])
    if writer is not None:
        writer.write_text(step, "samples", metrics_lib.samples_markdown(records))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(config, workdir: str) -> loop.LoopResult:
    """Run (or resume) SFT in `workdir`; returns the loop result (final state, step, last metrics row,
    whether a signal stopped it)."""
    mesh = setup.setup_run(config, workdir, validate=functools.partial(validate_config, config),
                           stage="pretrain" if config.data.kind == "text" else "sft")
    options = setup.compiler_options(config)
    files = resolve_data(config, workdir)
    tokenizer = loading.load_tokenizer(files.tokenizer)
    model = loading.architecture(config.init, config.model, heads=("lm",), vocab_size=len(tokenizer))
    loading.check_vocab(model, tokenizer, config.init, tokenizer_setting=config.data.tokenizer)  # before tokenizing
    loading.save_tokenizer(tokenizer, workdir)
    train_split = load_lm_split(config, files.train, tokenizer, workdir)
    eval_split = prompt_split = None
    if files.eval:
        eval_split = load_lm_split(config, files.eval, tokenizer, workdir)
        if config.eval.num_samples and config.data.kind != "text":
            prompt_split = load_lm_split(config, files.eval, tokenizer, workdir, batch_format="prompts")
    for name, split in (("train", train_split), ("eval", eval_split)):
        if split is not None:
            setup.report_data(workdir, name, split, LENGTH_KEYS)
    train_split.check_batch_size(config.batch_size, "config.batch_size")  # before the model is built

    # ---- model, optimizer, state (resumed when WORKDIR/checkpoints has one) ----------------------
    adapted = lora_state.setup(config, model, mesh, options)  # None unless config.lora.rank > 0
    built = state_lib.build_state(config, adapted.model if adapted else model, mesh, workdir, config.num_steps,
                                  options, trainable=adapted.trainable if adapted else None)
    lora_state.memory_report(built.state, adapted.frozen if adapted else None)
    batches = train_split.iterator(config.batch_size, seed=config.seed)
    if built.resumed is not None:
        batches.set_state(built.meta["data"])

    # ---- jitted step and loop ---------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, resume_step=built.resumed)
    step_kwargs = dict(grad_accum=config.grad_accum, weight_fn=target_tokens)
    if adapted is None:
        step_fn = state_lib.make_train_step(make_loss_fn(model), built.optimizer, built.schedule, **step_kwargs)
        train_step = state_lib.jit_train_step(step_fn, built.state_sh, sharding.batch_sharding(mesh), options)
        eval_fn = make_eval_fn(config, model, eval_split, prompt_split, tokenizer, mesh, built.param_sh, workdir,
                               writer)
    else:
        train_step = lora_state.jit_train_step(adapted, make_loss_fn(adapted.model), built,
                                               sharding.batch_sharding(mesh), options, **step_kwargs)
        full_eval = make_eval_fn(config, adapted.eval_model, eval_split, prompt_split, tokenizer, mesh,
                                 adapted.full_sh, workdir, writer)
        eval_fn = lambda state: full_eval(adapted.full(state))  # noqa: E731
    meta_fn = lambda state: {"data": batches.get_state(), "model": loading.model_meta(model),  # noqa: E731
                             "tokenizer": str(pathlib.Path(workdir, "tokenizer").absolute()), "stage": "sft",
                             **({"lora": adapted.meta} if adapted else {})}
    try:
        result = loop.train_loop(config, state=built.state, step_fn=train_step, batches=batches,
                                 place=lambda batch: sharding.shard_batch(batch, mesh),
                                 checkpointer=built.checkpointer, writer=writer, meta_fn=meta_fn,
                                 items_fn=state_lib.state_items, eval_fn=eval_fn,
                                 desc="pretrain" if config.data.kind == "text" else "sft")
    finally:
        writer.close()
        built.checkpointer.close()
    return result
