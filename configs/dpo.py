"""Direct preference optimisation configs: `get_config("PRESET[,VARIANT]")`.

    python experiments/train_dpo.py --config configs/dpo.py:tiny --workdir /tmp/dpo
    python experiments/train_dpo.py --config configs/dpo.py:tiny,ipo --workdir /tmp/ipo \
        --config.init.source=checkpoint --config.init.path=/tmp/sft

Presets: tiny (CPU; with no data configured a fresh small model on rankings built from the
built-in task, or an SFT checkpoint with --config.init.*), gpt2 (GPT-2 124M from an SFT checkpoint).
VARIANT (rlhf_jax/preference.py): dpo (default), cdpo, ipo, simpo. It sets `dpo.loss_type` and
`dpo.label_smoothing`; `dpo.beta` < 0 means the loss type's default: DPO 0.1 (Rafailov et al.
2023), IPO 0.1 on length-averaged log-probs (TRL's default and form), SimPO 2.0 with gamma 0.5 (the
values issue 17 proposes and torchtune's SimPOLoss defaults, which it documents as beta typically
2.0-2.5 and gamma in (0, 1.5]; Meng et al. 2024 tune them per model; not re-tuned for small models).
Log-prob form passed to `losses.dpo_loss`: sigmoid (DPO, cDPO) and SimPO get summed response
log-probs (SimPO divides by the lengths itself), IPO length-averaged ones.
"""
from __future__ import annotations

import ml_collections

from configs import common
from rlhf_jax.preference import VARIANTS as ALL_VARIANTS

PRESETS = ("tiny", "gpt2")
VARIANTS = tuple(v for v, (_, _, online) in ALL_VARIANTS.items() if not online)  # online_dpo: the pipeline's


def dpo_section(variant: str = "dpo") -> ml_collections.ConfigDict:
    """The loss (rlhf_jax.preference.resolve_variant reads it)."""
    loss_type, label_smoothing, _ = ALL_VARIANTS[variant]
    return ml_collections.ConfigDict(dict(
        loss_type=loss_type,  # "sigmoid" (DPO / cDPO), "ipo", "simpo"; "" = the pipeline algorithm's
        beta=-1.0,  # inverse temperature beta; < 0 = the loss type's default (sigmoid/ipo 0.1, simpo 2.0)
        label_smoothing=label_smoothing,  # cDPO's eps (label flip rate) in [0, 0.5); < 0 = variant's
        gamma=0.5,  # SimPO's target reward margin gamma (other loss types ignore it)
        reference_path="",  # frozen reference: "" = the starting model (init); else a checkpoint (run dir)
        reference="in_step",  # reference log-probs: "in_step" (the frozen SFT model inside each jitted
        #                       step) or "precompute" (once per dataset before training); SimPO needs none
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, variant = (arg or "tiny").partition(",")
    variant = variant or "dpo"
    if preset not in PRESETS:
        raise ValueError(f"configs/dpo.py: unknown preset {preset!r} (allowed: {', '.join(map(repr, PRESETS))})")
    if variant not in VARIANTS:
        raise ValueError(f"configs/dpo.py: unknown variant {variant!r} (allowed: {', '.join(map(repr, VARIANTS))})")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    c.variant = variant  # which variant built this config (informational; dpo.* holds the loss)
    common.add_run_fields(c, num_steps=0, log_every=10, eval_every=0, save_every=100)
    c.num_steps = 0  # optimizer updates; 0 = num_epochs passes over the training rankings
    c.num_epochs = 1  # passes over the training rankings when num_steps is 0
    c.batch_size = 16  # prompts per update (each with its K ranked responses: K(K-1)/2 pairs), global
    c.grad_accum = 1  # microbatches per update (in-step scan), weighted by their number of pairs
    c.dpo = dpo_section(variant)

    # ---- model and where it starts (the policy; the frozen reference is the same starting model) ----
    c.model = common.model_config()  # architecture for init.source="scratch"; dtype/remat/dropout always
    c.init = common.init_config("scratch")  # "checkpoint": an SFT run (policy and reference) | "hf"
    c.lora = common.lora_config()  # rank > 0: train adapters only; the reference is the adapter-free policy

    # ---- data: the RM's ranking data (every ordered pair of a K-way ranking is one DPO pair) ----------
    c.data = common.ranking_data_config()

    # ---- evaluation ---------------------------------------------------------------------------------
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=16,  # eval prompts per batch (global)
        num_batches=0,  # eval batches per evaluation; 0 = the whole eval file
    ))

    # ---- optimisation: DPO uses small learning rates (Rafailov et al.: 1e-6 on billion-scale models) --
    c.optim = common.optim_config(learning_rate=1e-4, warmup_steps=5, weight_decay=0.0)

    if preset == "gpt2":
        c.init = common.init_config("checkpoint", "")  # give --config.init.path=SFT_WORKDIR
        c.model.update(family="gpt2", dtype="bfloat16")
        c.data.update(max_len=1024, max_prompt_len=512)
        c.batch_size = 64
        c.optim.update(learning_rate=1e-6, warmup_steps=150)
        c.log_every, c.eval_every = 10, 200
        c.checkpoint.save_every = 500
        c.eval.update(batch_size=64, num_batches=0)
    return c
