"""Reward-model configs (InstructGPT stage 2): `get_config("tiny" | "gpt2" | "qwen2")`.

    python experiments/train_rm.py --config configs/rm.py:tiny --workdir /tmp/rm --config.seed 1
    python experiments/train_rm.py --config configs/rm.py:tiny --workdir /tmp/rm \
        --config.init.source=checkpoint --config.init.path=/tmp/sft

- tiny  : CPU. Standalone: a fresh small model on rankings built from the built-in task (K
          demonstrations per prompt, some wrong or chatty, ranked by a simulated labeler) when no
          data is configured; or from an SFT checkpoint with --config.init.*.
- gpt2  : GPT-2 124M RM from an SFT checkpoint (--config.init.path=SFT_WORKDIR); accelerators.
- qwen2 : Qwen2-0.5B RM from an SFT checkpoint, FSDP.
One epoch over the training rankings by default (num_steps=0); the RM overfits after that
(Ouyang et al. 2022, appendix C.2).
"""
from __future__ import annotations

import ml_collections

from configs import common

PRESETS = ("tiny", "gpt2", "qwen2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"configs/rm.py: unknown preset {preset!r} (allowed: {', '.join(map(repr, PRESETS))})")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    common.add_run_fields(c, num_steps=0, log_every=5, eval_every=0, save_every=50)
    c.num_steps = 0  # optimizer updates; 0 = num_epochs passes over the training rankings
    c.num_epochs = 1  # passes over the training rankings when num_steps is 0
    c.batch_size = 16  # prompts per update (each with its K ranked responses), global
    c.grad_accum = 1  # microbatches per update (in-step scan)

    # ---- model and where it starts -----------------------------------------------------------------
    c.model = common.model_config()  # architecture for init.source="scratch"; dtype/remat/dropout always
    c.init = common.init_config("scratch")  # "checkpoint": an SFT run (unembedding dropped, scalar head added)
    c.lora = common.lora_config()  # rank > 0: train adapters + the scalar head only on the frozen init

    # ---- data --------------------------------------------------------------------------------------
    c.data = common.ranking_data_config()

    # ---- evaluation and reward normalisation ------------------------------------------------------
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=16,  # eval prompts per batch (global)
        num_batches=0,  # eval batches per evaluation; 0 = the whole eval file
    ))
    c.normalize = ml_collections.ConfigDict(dict(
        num_batches=8,  # training batches whose best (rank 0) responses define score 0; 0 = all
        scale=False,  # also divide by their standard deviation (scores then have unit variance)
    ))

    # ---- optimisation ------------------------------------------------------------------------------
    c.optim = common.optim_config(learning_rate=1e-3, warmup_steps=3)

    if preset == "gpt2":
        c.init = common.init_config("checkpoint", "")  # give --config.init.path=SFT_WORKDIR
        c.model.update(family="gpt2", dtype="bfloat16")
        c.data.update(max_len=1024, max_prompt_len=512)
        c.batch_size = 64
        c.optim.update(learning_rate=9e-6, warmup_steps=20, weight_decay=0.0)
        c.log_every, c.eval_every = 10, 200
        c.checkpoint.save_every = 500
        c.eval.update(batch_size=64, num_batches=0)
    elif preset == "qwen2":
        c.init = common.init_config("checkpoint", "")  # give --config.init.path=SFT_WORKDIR
        c.model.update(dtype="bfloat16", remat=True)
        c.data.update(max_len=2048, max_prompt_len=1024)
        c.batch_size, c.grad_accum = 64, 2
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.optim.update(learning_rate=5e-6, warmup_steps=20, weight_decay=0.0)
        c.log_every, c.eval_every = 10, 200
        c.checkpoint.save_every = 500
        c.eval.update(batch_size=64, num_batches=0)
    return c
