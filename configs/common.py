"""Config pieces shared by every stage (configs/sft.py, rm.py, ppo.py, ...).

Each helper returns an `ml_collections.ConfigDict` with a comment on every field; keyword
arguments override the defaults. The trainers read them through rlhf_jax.loading (init), rlhf_jax.optim and rlhf_jax.trainers.setup.
"""
from __future__ import annotations

import ml_collections


def model_config(**fields) -> ml_collections.ConfigDict:
    """Architecture when a model is built from scratch (rlhf_jax.models.TransformerConfig fields).

    When a stage starts from a checkpoint or a Hugging Face directory the architecture comes from
    there and only the runtime fields (dtype, remat, dropout_rate) are taken from here.
    """
    base = dict(
        family="llama",  # "llama" (RoPE, RMSNorm, SwiGLU; Qwen2 with qkv_bias) or "gpt2" (learned pos, LayerNorm, GELU)
        vocab_size=0,  # token vocabulary; 0 = the tokenizer's size
        d_model=64,  # residual width
        n_layers=2,  # decoder blocks
        n_heads=4,  # attention heads
        n_kv_heads=0,  # grouped-query KV heads; 0 means n_heads
        d_ff=256,  # MLP hidden width
        max_len=128,  # longest sequence (learned position table / RoPE range)
        qkv_bias=False,  # q/k/v projection bias (Qwen2)
        dropout_rate=0.0,  # residual/embedding dropout while training (0 = off)
        dtype="float32",  # compute dtype ("bfloat16" on accelerators); params stay float32
        remat=False,  # recompute blocks in the backward pass to save memory
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def init_config(source: str = "scratch", path: str = "") -> ml_collections.ConfigDict:
    """Where a stage's model starts (stage hand-off)."""
    return ml_collections.ConfigDict(dict(
        source=source,  # "scratch" (fresh config.model), "checkpoint" (an earlier stage), "hf" (HF dir);
        #                 PPO roles also take "actor" / "reward" (a copy of that role) and "none" (no reward model)
        path=path,  # checkpoint: a stage workdir, its checkpoints/ dir or one step dir; hf: local HF dir
    ))


def optim_config(**fields) -> ml_collections.ConfigDict:
    """AdamW with linear warmup + cosine decay (rlhf_jax.optim.make_optimizer)."""
    base = dict(
        learning_rate=1e-3,  # peak learning rate
        warmup_steps=10,  # linear warmup from 0, in optimizer updates
        decay_steps=0,  # cosine decay ends here (in updates); 0 = num_steps
        final_lr_ratio=0.1,  # lr at the end of the decay / peak (1 = constant after warmup)
        max_grad_norm=1.0,  # global-norm gradient clipping; 0 = off
        b1=0.9,  # Adam beta1
        b2=0.95,  # Adam beta2
        eps=1e-8,  # Adam epsilon
        weight_decay=0.1,  # decoupled weight decay on matrices (kernels, embeddings)
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def mesh_config(**fields) -> ml_collections.ConfigDict:
    """Device mesh (rlhf_jax.sharding.make_mesh): data * fsdp * tensor = number of devices."""
    base = dict(
        data=-1,  # data-parallel axis; -1 = all devices left over
        fsdp=1,  # parameter-sharding (ZeRO-3) axis; also splits the batch
        tensor=1,  # tensor-parallel axis (heads, MLP, vocab)
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def distributed_config(**fields) -> ml_collections.ConfigDict:
    """Multi-process / multi-host start-up (jax.distributed.initialize)."""
    base = dict(
        initialize=False,  # call jax.distributed.initialize before anything else
        coordinator_address="",  # "host:port" of process 0; "" = auto-detect (SLURM, TPU, Open MPI)
        num_processes=-1,  # -1 = auto-detect
        process_id=-1,  # -1 = auto-detect
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def checkpoint_config(**fields) -> ml_collections.ConfigDict:
    """Orbax checkpoints under WORKDIR/checkpoints (the last step is always saved)."""
    base = dict(
        save_every=50,  # steps between checkpoints
        max_to_keep=2,  # newest checkpoints kept on disk
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def wandb_config(**fields) -> ml_collections.ConfigDict:
    """Optional Weights & Biases logging beside metrics.jsonl and TensorBoard (rlhf_jax.metrics)."""
    base = dict(
        enabled=False,  # also log metrics and sample texts to W&B (needs `pip install wandb`)
        mode="offline",  # "offline": files under WORKDIR/wandb, no network (`wandb sync` later); "online"
        project="rlhf_jax",  # W&B project
        name="",  # run name; "" = the workdir's name
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def lora_config(**fields) -> ml_collections.ConfigDict:
    """LoRA (Hu et al. 2021) on the frozen model's projections (rlhf_jax.lora, through qwix)."""
    base = dict(
        rank=0,  # adapter rank r; 0 = LoRA off (every parameter is trained)
        alpha=16.0,  # the update is scaled by alpha / rank
        dropout=0.0,  # dropout on the adapters' input, training steps only
        target_modules=r"(layers/)?(attn/(q|k|v|o)|mlp/(gate|up|down))",  # regex over a projection's path
        #   ("layers/attn/q", "layers/mlp/down"); default: every attention (q, k, v, o) and MLP projection
        modules_to_save="",  # parameter groups trained in full next to the adapters (PEFT's term), comma-
        #   separated: "embed", "pos_embed", "final_norm", "lm_head" (the RM / a shared critic add "value_head")
        quantize="none",  # QLoRA: store the frozen adapted kernels as "int8" or "nf4" (4-bit NormalFloat,
        #   Dettmers et al. 2023), dequantised on the fly; "none" = fp32
        quantize_block=64,  # inputs per absmax scale of the quantised kernels (must divide d_model, d_ff and
        #   heads x head_dim; 0 = one scale per output channel). With quantize, rank must differ from every
        #   projection size
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def add_run_fields(c: ml_collections.ConfigDict, *, num_steps: int, log_every: int, eval_every: int,
                   save_every: int) -> None:
    """Fields every stage has: seed, length, logging/eval cadence, mesh, distributed, checkpoints, W&B."""
    c.seed = 0  # seeds model init, data order, dropout and sampling
    c.num_steps = num_steps  # optimizer updates in the whole run (a resumed run continues up to it)
    c.log_every = log_every  # steps between metric rows (metrics.jsonl, TensorBoard, progress bar)
    c.eval_every = eval_every  # steps between evaluations; 0 = only at the end
    c.max_nonfinite_streak = 5  # stop after this many consecutive steps with NaN/Inf loss or gradients
    c.fast_compile = False  # XLA backend optimisation off: ~2x faster CPU compiles, slower steps (tests, smoke runs)
    c.mesh = mesh_config()
    c.distributed = distributed_config()
    c.checkpoint = checkpoint_config(save_every=save_every)
    c.wandb = wandb_config()


def ranking_data_config(**fields) -> ml_collections.ConfigDict:
    """Preference data of the RM and DPO stages (rlhf_jax/trainers/ranking_data.py)."""
    base = dict(
        kind="rankings",  # "rankings" (K responses + ranking), "comparisons" (chosen/rejected), "hh"
        train="",  # training file(s), comma-separated; "" = rankings built from the built-in task
        eval="",  # held-out file of the same kind; "" = the built-in task's held-out rankings (or none)
        tokenizer="",  # local HF tokenizer dir; "" = init.path's (hf) / the checkpoint's / built-in task's
        template="auto",  # chat template (rlhf_jax.data.TEMPLATES)
        max_len=64,  # sequence length T of each prompt + response
        max_prompt_len=0,  # prompt budget (left-truncated); 0 = max_len // 2
        cache_dir="",  # TFDS array_record cache; "" = WORKDIR/data
        builtin_responses=2,  # built-in task only: responses K per prompt
        builtin_prompts=512,  # built-in task only: training prompts (held-out: a quarter of this)
        builtin_error_rate=0.5,  # built-in task only: chance that a response is a corrupted answer
        builtin_labeler_temperature=0.1,  # built-in task only: labeler noise (Plackett-Luce temperature)
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)
