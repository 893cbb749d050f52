"""RL stage (InstructGPT stage 3) configs: `get_config("PRESET[,ALGORITHM]")`, PRESET one of
"tiny" | "gpt2" | "qwen2", ALGORITHM one of rlhf_jax.algorithms.ALGORITHMS (default ppo).

    python experiments/train_ppo.py --config configs/ppo.py:tiny --workdir /tmp/ppo --config.seed 1
    python experiments/train_ppo.py --config configs/ppo.py:tiny,grpo --workdir /tmp/grpo

- tiny  : CPU, seconds per iteration. With no checkpoints configured it initialises a small
          actor itself and trains on a rule-based reward (emit token 3) over synthetic prompts.
- gpt2  : GPT-2 124M from a local Hugging Face directory / SFT and RM checkpoints; accelerators.
- qwen2 : Qwen2-0.5B-style Llama-family model (RoPE, RMSNorm, SwiGLU, GQA, qkv bias); accelerators.
"""
from __future__ import annotations

import ml_collections

from configs import common
from rlhf_jax.algorithms.catalog import ALGORITHMS

PPO_OPTIM = dict(warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.0)  # constant lr, no decay; steps count
#   optimizer updates (= ppo.epochs x ppo.num_minibatches per iteration)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, _, algorithm = (arg or "tiny").partition(",")
    if preset not in ("tiny", "gpt2", "qwen2"):
        raise ValueError(f"configs/ppo.py: unknown preset {preset!r} (allowed: 'tiny', 'gpt2', 'qwen2')")
    if algorithm and algorithm not in ALGORITHMS:
        raise ValueError(f"configs/ppo.py: unknown algorithm {algorithm!r} (allowed: {', '.join(ALGORITHMS)})")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    c.seed = 0  # seeds model init (when standalone), sampling and minibatch shuffling
    c.num_steps = 40  # PPO iterations (rollout + update) to run in total

    # ---- models: one section per role, each with an `init` like SFT/RM's ---------------------------
    c.model = common.model_config(vocab_size=64, d_model=32, d_ff=64, max_len=64)  # a from-scratch actor
    #          (actor.init.source="scratch"); with a checkpoint only dtype / remat come from here (dropout is off)
    c.actor = ml_collections.ConfigDict(dict(
        init=common.init_config("scratch"),  # the SFT policy: "scratch" | "checkpoint" (SFT run dir) | "hf"
        optim=common.optim_config(learning_rate=3e-3, **PPO_OPTIM),  # AdamW (+ a shared value head)
        lora=common.lora_config(),  # rank > 0: train adapters only; the reference is the adapter-free actor
        #   (quantize int8 / nf4: the base and so the reference held quantised, QLoRA)
    ))
    c.reference = ml_collections.ConfigDict(dict(
        init=common.init_config("actor"),  # frozen reference: "actor" (the actor's starting weights) |
        #                                    "checkpoint" | "hf"
    ))
    c.critic = ml_collections.ConfigDict(dict(
        type="token",  # "token": separate per-token critic (DeepSpeed-Chat); "shared": value head on the
        #                actor trunk; "sequence": one value per response (ColossalChat)
        init=common.init_config("actor"),  # critic trunk (+ a fresh value head when it has none): "actor" |
        #                                    "reward" (a copy of the starting weights of that role) | "checkpoint" | "hf"
        optim=common.optim_config(learning_rate=3e-3, **PPO_OPTIM),  # AdamW of a separate critic
        lora=common.lora_config(),  # rank > 0 (separate critic, init "reward" or "actor"): train adapters + the
        #   value head over that role's frozen weights, read in place (a shared critic uses actor.lora);
        #   quantize over "reward": the RM scores through the quantised base; over "actor": as actor.lora's
    ))
    c.reward = ml_collections.ConfigDict(dict(
        init=common.init_config("none"),  # frozen reward model: "none" (rule rewards only) | "checkpoint"
        #                                   (RM run dir, its stored normalisation applied) | "hf"
    ))
    c.ema_decay = 0.0  # EMA of actor weights (e.g. 0.992 as in DeepSpeed-Chat); 0 = off

    # ---- the algorithm (rlhf_jax/algorithms/catalog.py: which pieces each one uses) -------------
    c.algorithm = ml_collections.ConfigDict(dict(
        name=algorithm or "ppo",  # ppo | ppo_penalty | grpo | dr_grpo | dapo | gspo | rloo | reinforce_pp |
        #              reinforce_pp_baseline | remax
        group_size=4,  # responses per prompt of the group algorithms (grpo, dr_grpo, dapo, gspo, rloo,
        #                reinforce_pp_baseline); rollout.batch_size counts responses; others use 1
        clip_eps_high=0.28,  # upper clip 1 + clip_eps_high of clip-higher algorithms (dapo)
        dual_clip=0.0,  # dual-clip bound c > 1 on negative advantages (Ye et al. 2020); 0 = off
        kl_in="",  # where the KL to the reference goes: "" = the algorithm's (catalog) | reward | loss | none
        kl_estimator="k3",  # per-token KL estimator when the KL is a loss term (grpo, dr_grpo): k1 | k3
        penalty_coef=1.0,  # ppo_penalty: initial β_pen of the KL(π_old ‖ π_θ) term
        penalty_target=0.01,  # ppo_penalty: d_targ (nats per token) of the doubling / halving rule
        overlong_buffer=4,  # dapo: soft overlong punishment over the last this many tokens (0 = off)
    ))

    # ---- rollout ------------------------------------------------------------------------------
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=16,  # responses per iteration, global over all devices (prompts = this / group size)
        prompt_len=8,  # prompt length P (left-padded / truncated from the left)
        max_new_tokens=8,  # response length N
        temperature=1.0,  # sampling temperature; the policy trained is the temperature-scaled one
        top_k=0,  # must stay 0: RL trains the unfiltered policy (a filter is refused)
        top_p=1.0,  # must stay 1 (as top_k)
        # Must equal the tokenizer's stop set (its eos_token plus generation_config.json's eos_token_id list)
        eos_id=ml_collections.FieldReference(1, field_type=object),  # stop token id or a list of them; -1 = none
        pad_id=0,  # padding token
    ))
    c.data = ml_collections.ConfigDict(dict(
        prompts="",  # JSONL prompts file; "" = synthetic random prompts (actor.init.source="scratch" only)
        tokenizer="",  # local HF tokenizer dir; "" = the one recorded with actor.init's checkpoint (or its HF dir)
        template="auto",  # chat template (rlhf_jax.data.chat.TEMPLATES)
        cache_dir="",  # TFDS array_record cache; "" = WORKDIR/data
        min_prompt_len=2,  # synthetic prompts: shortest prompt (the rest is left padding)
        ptx="",  # plain-text pretraining corpus for PPO-ptx; "" = synthetic counting sequences
    ))

    # ---- reward -------------------------------------------------------------------------------
    c.rewards = ml_collections.ConfigDict(dict(
        rm_weight=0.0,  # weight of the (normalised) reward-model score; needs reward.init
        score_clip=0.0,  # clip the total score to ±score_clip before KL shaping; 0 = off
        functions="",  # host reward functions on decoded text (rlhf_jax/host_rewards.py), comma-separated
        #               "pkg.module:function=weight" (weight 1 if left out), e.g.
        #               "rlhf_jax.tasks.answers:exact_match,rlhf_jax.tasks.answers:answer_format=0.1"
        rules=dict(  # rule-based rewards (rlhf_jax/rewards.py); weight 0 = off
            target_token=dict(weight=1.0, token=3),  # +weight per emitted `token`
            length=dict(weight=0.0, target=4),  # −weight·|length − target|
            missing_eos=dict(weight=0.0),  # −weight when the response has no stop token (rollout.eos_id)
            overlong=dict(weight=0.0, buffer=4),  # DAPO soft overlong punishment over the last `buffer` tokens
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

    c.max_nonfinite_streak = 3  # stop after this many consecutive iterations with a skipped update

    # ---- mesh, distributed, checkpoints, logging ----------------------------------------------
    c.mesh = common.mesh_config()
    c.distributed = common.distributed_config()
    c.checkpoint = common.checkpoint_config(save_every=10)
    c.wandb = common.wandb_config()
    c.log_every = 1  # iterations between metric rows
    c.log_samples = 2  # rollout responses shown as TensorBoard text ("samples") per logged iteration; 0 = none
    c.profile_phases = False  # jit rollout and update apart to log time/rollout and time/update
    c.fast_compile = False  # XLA backend optimisation off: ~2x faster CPU compiles but slower steps;
    #                         pays off only for runs of a few iterations (tests, smoke runs)

    if preset == "gpt2":
        c.model = common.model_config(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                                      d_ff=3072, max_len=1024, dtype="bfloat16")
        c.actor.init.update(source="checkpoint", path="runs/sft_gpt2")  # train_sft.py --config configs/sft.py:gpt2
        c.reward.init.update(source="checkpoint", path="runs/rm_gpt2")  # train_rm.py --config configs/rm.py:gpt2
        c.critic.init.source = "reward"
        c.data.prompts = "prompts.jsonl"  # your PPO prompts; the tokenizer comes with the SFT checkpoint
        c.rewards.rm_weight = 1.0
        c.rewards.rules.target_token.weight = 0.0
        c.rewards.rules.missing_eos.weight = 1.0
        c.rollout.update(batch_size=64, prompt_len=256, max_new_tokens=256, eos_id=50256, pad_id=50256)
        c.ppo.update(epochs=1, num_minibatches=4)
        c.kl.update(coef=0.1, adaptive=True)
        c.actor.optim.update(learning_rate=1e-6, warmup_steps=10)
        c.critic.optim.update(learning_rate=5e-6, warmup_steps=10)
        c.ema_decay = 0.992
        c.num_steps = 1000
        c.checkpoint.save_every = 100
    elif preset == "qwen2":
        c.model = common.model_config(family="llama", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                                      n_kv_heads=2, d_ff=4864, max_len=2048, qkv_bias=True, dtype="bfloat16",
                                      remat=True)
        c.actor.init.update(source="checkpoint", path="runs/sft_qwen2")  # train_sft.py --config configs/sft.py:qwen2
        c.reward.init.update(source="checkpoint", path="runs/rm_qwen2")  # train_rm.py --config configs/rm.py:qwen2
        c.critic.init.source = "reward"
        c.data.prompts = "prompts.jsonl"  # your PPO prompts; the tokenizer comes with the SFT checkpoint
        c.rewards.rm_weight = 1.0
        c.rewards.rules.target_token.weight = 0.0
        c.rewards.rules.missing_eos.weight = 1.0
        c.rollout.update(batch_size=64, prompt_len=512, max_new_tokens=512, eos_id=151643, pad_id=151643)
        c.ppo.update(epochs=1, num_minibatches=4)
        c.kl.update(coef=0.05, adaptive=True)
        c.actor.optim.update(learning_rate=5e-7, warmup_steps=10)
        c.critic.optim.update(learning_rate=5e-6, warmup_steps=10)
        c.mesh.update(data=1, fsdp=-1, tensor=1)  # ZeRO-3 style: params sharded, batch split
        c.num_steps = 1000
        c.checkpoint.save_every = 100
    return c
