"""PPO / PPO-ptx (InstructGPT stage 3) configs: `get_config("tiny" | "gpt2" | "qwen2")`.

    python experiments/train_ppo.py --config configs/ppo.py:tiny --workdir /tmp/ppo --config.seed 1

- tiny  : CPU, seconds per iteration. With no checkpoints configured it initialises a small
          actor itself and trains on a rule-based reward (emit token 3) over synthetic prompts.
- gpt2  : GPT-2 124M from a local Hugging Face directory / SFT and RM checkpoints; accelerators.
- qwen2 : Qwen2-0.5B-style Llama-family model (RoPE, RMSNorm, SwiGLU, GQA, qkv bias); accelerators.
"""
from __future__ import annotations

import ml_collections


def model_config(**fields) -> ml_collections.ConfigDict:
    """Architecture used when the actor is initialised from scratch (TransformerConfig fields)."""
    base = dict(
        family="llama",  # "llama" (RoPE, RMSNorm, SwiGLU) or "gpt2" (learned pos, LayerNorm, GELU)
        vocab_size=64,  # token vocabulary
        d_model=32,  # residual width
        n_layers=2,  # decoder blocks
        n_heads=4,  # attention heads
        n_kv_heads=0,  # grouped-query KV heads; 0 means n_heads
        d_ff=64,  # MLP hidden width
        max_len=64,  # longest prompt + response
        qkv_bias=False,  # q/k/v projection bias (Qwen2)
        dtype="float32",  # compute dtype ("bfloat16" on accelerators); params stay float32
        remat=False,  # recompute blocks in the backward pass to save memory
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def optim_config(**fields) -> ml_collections.ConfigDict:
    """AdamW with warmup + cosine decay (rlhf_jax.trainers.common.make_optimizer fields)."""
    base = dict(
        learning_rate=3e-3,  # peak learning rate
        warmup_steps=0,  # linear warmup, in optimizer updates (epochs x minibatches per iteration)
        decay_steps=0,  # cosine decay length in updates; 0 = the whole run
        final_lr_ratio=1.0,  # lr at the end of the decay / peak (1 = constant after warmup)
        max_grad_norm=1.0,  # global-norm clipping; 0 = off
        b1=0.9,  # Adam beta1
        b2=0.95,  # Adam beta2
        eps=1e-8,  # Adam epsilon
        weight_decay=0.0,  # decoupled weight decay on matrices
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in ("tiny", "gpt2", "qwen2"):
        raise ValueError(f"configs/ppo.py: unknown preset {preset!r} (allowed: 'tiny', 'gpt2', 'qwen2')")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    c.seed = 0  # seeds model init (when standalone), sampling and minibatch shuffling
    c.num_steps = 40  # PPO iterations (rollout + update) to run in total

    # ---- models and stage hand-off ------------------------------------------------------------
    c.model = model_config()  # architecture for a from-scratch actor (ignored when loading one)
    c.actor_checkpoint = ""  # SFT checkpoint dir (Orbax) or HF dir; "" = fresh init (tiny only)
    c.reward_checkpoint = ""  # RM checkpoint dir; "" = no reward model (rule rewards only)
    c.critic = "token"  # "token": separate per-token critic (DeepSpeed-Chat); "shared": value head
    #                      on the actor trunk; "sequence": one scalar per prompt (ColossalChat)
    c.critic_init = "actor"  # critic trunk (+ fresh value head) from "actor" (SFT) or "reward" (the RM)
    c.ema_decay = 0.0  # EMA of actor weights (e.g. 0.992 as in DeepSpeed-Chat); 0 = off

    # ---- rollout ------------------------------------------------------------------------------
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=16,  # prompts (= responses) per PPO iteration, global over all devices
        prompt_len=8,  # prompt length P (left-padded / truncated from the left)
        max_new_tokens=8,  # response length N
        temperature=1.0,  # sampling temperature; the policy trained is the temperature-scaled one
        top_k=0,  # 0 = off (PPO should sample from the full policy)
        top_p=1.0,  # 1 = off
        eos_id=1,  # end-of-sequence token (-1 = none)
        pad_id=0,  # padding token
    ))
    c.data = ml_collections.ConfigDict(dict(
        prompts="",  # JSONL prompts file; "" = synthetic random prompts (from-scratch actor only)
        tokenizer="",  # local HF tokenizer dir for `prompts` / `ptx`
        template="auto",  # chat template (rlhf_jax.data.chat.TEMPLATES)
        cache_dir="",  # TFDS array_record cache; "" = WORKDIR/data
        min_prompt_len=2,  # synthetic prompts: shortest prompt (the rest is left padding)
        ptx="",  # plain-text pretraining corpus for PPO-ptx; "" = synthetic counting sequences
    ))

    # ---- reward -------------------------------------------------------------------------------
    c.rewards = ml_collections.ConfigDict(dict(
        rm_weight=0.0,  # weight of the (normalised) reward-model score; needs reward_checkpoint
        score_clip=0.0,  # clip the total score to ±score_clip before KL shaping; 0 = off
        rules=dict(  # rule-based rewards (rlhf_jax/rewards.py); weight 0 = off
            target_token=dict(weight=1.0, token=3),  # +weight per emitted `token`
            length=dict(weight=0.0, target=4),  # −weight·|length − target|
            missing_eos=dict(weight=0.0, eos_id=1),  # −weight when the response has no EOS
        ),
    ))

    # ---- PPO ----------------------------------------------------------------------------------
    c.ppo = ml_collections.ConfigDict(dict(
        epochs=2,  # passes over each rollout batch
        num_minibatches=2,  # minibatches per epoch (batch_size must divide evenly)
        clip_eps=0.2,  # policy ratio clip
        value_clip_eps=0.2,  # value clip around the rollout values
        gamma=1.0,  # discount
        lam=0.95,  # GAE lambda
        whiten_advantages=True,  # normalise advantages over the valid tokens of the batch
        vf_coef=0.5,  # value-loss weight when the critic shares the actor trunk
        entropy_coef=0.0,  # entropy bonus on the actor loss
    ))
    c.kl = ml_collections.ConfigDict(dict(
        coef=0.05,  # initial KL penalty β (per-token −β·(log π − log π_ref) in the reward)
        adaptive=False,  # Ziegler et al. 2019 controller toward `target`
        target=6.0,  # target KL per sequence (nats) for the adaptive controller
        horizon=10000,  # controller horizon (in responses)
        blowup_threshold=50.0,  # log a warning when the sequence KL exceeds this
    ))
    c.ptx = ml_collections.ConfigDict(dict(
        coef=0.0,  # PPO-ptx: actor loss + coef · LM loss on pretraining data; 0 = off
        batch_size=16,  # pretraining sequences per iteration (split over minibatches)
        seq_len=16,  # pretraining sequence length
    ))

    # ---- optimisation -------------------------------------------------------------------------
    c.actor_optim = optim_config(learning_rate=3e-3)  # actor AdamW (and the shared value head)
    c.critic_optim = optim_config(learning_rate=3e-3)  # separate critic AdamW
    c.max_nonfinite_streak = 3  # stop after this many consecutive iterations with a skipped update

    # ---- mesh, distributed, checkpoints, logging ----------------------------------------------
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # data-parallel axis size; -1 = all devices left over
        fsdp=1,  # parameter-sharding axis size
        tensor=1,  # tensor-parallel axis size
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False,  # call jax.distributed.initialize (multi-process / multi-host)
        coordinator_address="",  # "host:port" of process 0; "" = auto-detect (SLURM, TPU, ...)
        num_processes=-1,  # -1 = auto-detect
        process_id=-1,  # -1 = auto-detect
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        save_every=10,  # iterations between checkpoints (the last iteration is always saved)
        keep=2,  # checkpoints kept on disk
    ))
    c.log_every = 1  # iterations between metric rows
    c.profile_phases = False  # jit rollout and update apart to log time/rollout and time/update

    if preset == "gpt2":
        c.model = model_config(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                               d_ff=3072, max_len=1024, dtype="bfloat16")
        c.actor_checkpoint = "checkpoints/sft_gpt2"
        c.reward_checkpoint = "checkpoints/rm_gpt2"
        c.critic_init = "reward"
        c.data.update(prompts="data/prompts.jsonl", tokenizer="checkpoints/sft_gpt2/tokenizer")
        c.rewards.rm_weight = 1.0
        c.rewards.rules.target_token.weight = 0.0
        c.rewards.rules.missing_eos.update(weight=1.0, eos_id=50256)
        c.rollout.update(batch_size=64, prompt_len=256, max_new_tokens=256, eos_id=50256, pad_id=50256)
        c.ppo.update(epochs=1, num_minibatches=4)
        c.kl.update(coef=0.1, adaptive=True)
        c.actor_optim.update(learning_rate=1e-6, warmup_steps=10)
        c.critic_optim.update(learning_rate=5e-6, warmup_steps=10)
        c.ema_decay = 0.992
        c.num_steps = 1000
        c.checkpoint.save_every = 100
    elif preset == "qwen2":
        c.model = model_config(family="llama", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                               n_kv_heads=2, d_ff=4864, max_len=2048, qkv_bias=True, dtype="bfloat16",
                               remat=True)
        c.actor_checkpoint = "checkpoints/sft_qwen2"
        c.reward_checkpoint = "checkpoints/rm_qwen2"
        c.critic_init = "reward"
        c.data.update(prompts="data/prompts.jsonl", tokenizer="checkpoints/sft_qwen2/tokenizer")
        c.rewards.rm_weight = 1.0
        c.rewards.rules.target_token.weight = 0.0
        c.rewards.rules.missing_eos.update(weight=1.0, eos_id=151643)
        c.rollout.update(batch_size=64, prompt_len=512, max_new_tokens=512, eos_id=151643, pad_id=151643)
        c.ppo.update(epochs=1, num_minibatches=4)
        c.kl.update(coef=0.05, adaptive=True)
        c.actor_optim.update(learning_rate=5e-7, warmup_steps=10)
        c.critic_optim.update(learning_rate=5e-6, warmup_steps=10)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.num_steps = 1000
        c.checkpoint.save_every = 100
    return c
