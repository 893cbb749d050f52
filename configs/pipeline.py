"""End-to-end pipeline configs (experiments/run_pipeline.py): `get_config("tiny" | "smoke" | "arithmetic" |
"arithmetic_smoke")`.

    python experiments/run_pipeline.py --workdir /tmp/rlhf                       # tiny
    python experiments/run_pipeline.py --workdir /tmp/rlhf --config.seed=1 --config.ppo.kl.coef=0.1
    python experiments/run_pipeline.py --workdir /tmp/rlhf --config.algorithm=grpo   # into /tmp/rlhf/grpo
    python experiments/run_pipeline.py --workdir /tmp/rlhf --config.algorithm=dpo    # into /tmp/rlhf/dpo
    python experiments/run_pipeline.py --workdir /tmp/rlvr --config.task=arithmetic  # the arithmetic preset

- tiny  : the default: the whole recipe on a 2-core CPU in <= 10 minutes, from a fresh workdir.
- smoke : a few steps per stage, for the test suite (well under a minute of steps).
- arithmetic : the verifiable-reward recipe (`task="arithmetic"`): pretrain -> SFT -> GRPO with the
  exact-match and format reward functions (no rankings, no RM) -> held-out accuracy and pass@k.
  run_pipeline.py picks this preset when the command line says --config.task=arithmetic.
- arithmetic_smoke : the same with a few steps per stage, for the test suite.

The stage sections `pretrain`, `sft`, `rm`, `ppo` are complete stage configs (configs/sft.py,
rm.py, ppo.py), so every stage field can be overridden (`--config.rm.optim.learning_rate=...`).
The pipeline fills in, at run time, what ties the stages together and says so in each stage's
config.json: data files, tokenizer, init/checkpoint paths, the TFDS cache and `seed` (every stage
gets `config.seed`).
"""
from __future__ import annotations

import ml_collections

from configs import dpo as dpo_configs
from configs import ppo as ppo_configs
from configs import rm as rm_configs
from configs import sft as sft_configs

PRESETS = ("tiny", "smoke", "arithmetic", "arithmetic_smoke")
TASKS = ("instructions", "arithmetic")


def task_config(**fields) -> ml_collections.ConfigDict:
    """The built-in instruction task (rlhf_jax.tasks.export_task) and its imperfect demonstrators."""
    base = dict(
        n_sft=4000,  # demonstrations for SFT
        n_sft_eval=100,  # demonstrations of held-out prompts, for the SFT eval loss only
        n_rm_prompts=3100,  # prompts whose SFT samples get ranked (the last n_rm_heldout are held out)
        n_rm_heldout=100,  # of those, prompts kept out of RM training (held-out RM accuracy)
        n_ppo_prompts=2000,  # PPO training prompts
        n_heldout=200,  # held-out prompts for the final evaluation (a split no stage trains on)
        n_corpus=5000,  # pretraining documents
        error_rate=0.1,  # chance that a demonstration is a wrong answer
        verbose_rate=0.6,  # chance that a demonstration is wrapped in chatty filler (labelers dislike it)
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def arithmetic_config(**fields) -> ml_collections.ConfigDict:
    """The built-in arithmetic word problems (rlhf_jax.tasks.arithmetic.export_arithmetic), GSM8K format."""
    base = dict(
        n_sft=4000,  # demonstrations (worked solutions) for SFT
        n_sft_eval=100,  # demonstrations of held-out problems, for the SFT eval loss only
        n_ppo_prompts=2000,  # RL training problems (the gold answer is the reward functions' `answer` field)
        n_heldout=200,  # held-out problems of the final evaluation
        n_corpus=4000,  # pretraining documents (solved training problems)
        min_ops=1,  # operations per problem: min_ops..max_ops (difficulty)
        max_ops=2,
        max_value=20,  # every number, intermediate results included, is in 0..max_value (difficulty)
        error_rate=0.2,  # chance that a demonstration's final step is off by one
        reward_functions="rlhf_jax.tasks.answers:exact_match,rlhf_jax.tasks.answers:answer_format=0.1",  # the RL
        #                  reward (config.ppo.rewards.functions of the RL stage); exact_match is the gold judge
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def rankings_config(**fields) -> ml_collections.ConfigDict:
    """Comparison data: K SFT samples per prompt ranked by a simulated (noisy) labeler."""
    base = dict(
        num_responses=4,  # K responses ranked per prompt (InstructGPT: 4 to 9)
        candidates=12,  # SFT samples drawn per prompt to find K distinct ones (prompts with fewer are skipped)
        temperature=1.0,  # sampling temperature of the candidates
        labeler_temperature=0.15,  # Plackett-Luce temperature on gold scores: 0 = noise-free labeler
        batch_size=256,  # sampling batch (rows)
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def eval_config(**fields) -> ml_collections.ConfigDict:
    """Final evaluation on the held-out prompts."""
    base = dict(
        num_samples=4,  # samples per prompt from SFT and from PPO (gold means and win rate use all)
        best_of=4,  # best-of-n: the RM picks among the first n SFT samples
        temperature=-1.0,  # sampling temperature of both policies; < 0 = ppo.rollout.temperature (the
        #                    policy PPO trained), which also makes kl_to_sft the KL of that policy
        batch_size=200,  # rows per sampling / scoring call
        num_report_samples=8,  # prompts shown before/after PPO in report.md
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def online_dpo_config(**fields) -> ml_collections.ConfigDict:
    """Online (iterative) DPO: rounds of sampling K responses per prompt from the current policy,
    ranking them, and a DPO pass over the new pairs (section `dpo` gives the loss and optimiser)."""
    base = dict(
        rounds=4,  # sampling + ranking + DPO rounds
        prompts_per_round=512,  # PPO training prompts sampled per round (consecutive slices, wrapping)
        num_responses=4,  # K responses ranked per prompt (all K(K-1)/2 ordered pairs train)
        candidates=8,  # samples drawn per prompt to find K distinct ones (prompts with fewer are skipped)
        ranker="rm",  # "rm": the reward model ranks; "labeler": the task's simulated labelers (gold + noise)
        steps_per_round=0,  # DPO updates per round; 0 = one epoch over the round's rankings
    )
    base.update(fields)
    return ml_collections.ConfigDict(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"configs/pipeline.py: unknown preset {preset!r} (allowed: {', '.join(map(repr, PRESETS))})")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    c.seed = 0  # seeds the task data, every stage (their `seed` is set to this) and the evaluation
    c.task = "arithmetic" if preset.startswith("arithmetic") else "instructions"  # the built-in task:
    #        "instructions" (RLHF with an RM, section `instructions`) | "arithmetic" (verifiable rewards, section
    #        `arithmetic`; its preset's stage settings)
    c.instructions = task_config()
    c.arithmetic = arithmetic_config()
    c.rankings = rankings_config()
    c.eval = eval_config()

    # ---- stage 0: pretraining on the task corpus (the architecture of every later model) ---------
    c.pretrain = sft_configs.get_config("tiny_pretrain")
    c.pretrain.model.update(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=64)
    c.pretrain.data.max_len = 64  # packed corpus blocks
    c.pretrain.batch_size = 32
    # Short and gentle on purpose: on this budget, longer pretraining on the task corpus (solved
    # instructions in another format, plus filler) delays SFT's learning to copy from the prompt
    # (measured on the d_model 64 model: held-out SFT gold 0.45 after 100 steps at 1e-3, 0.46 from scratch).
    c.pretrain.num_steps = 100
    c.pretrain.optim.update(learning_rate=1e-3, warmup_steps=20)
    c.pretrain.log_every, c.pretrain.eval_every, c.pretrain.checkpoint.save_every = 25, 0, 100

    # ---- stage 1: SFT on demonstrations -----------------------------------------------------------
    c.sft = sft_configs.get_config("tiny")
    c.sft.data.update(max_len=40, max_prompt_len=16)  # prompts <= 12 tokens, responses <= 24
    c.sft.batch_size = 32
    c.sft.num_steps = 1000
    c.sft.optim.update(learning_rate=3e-3, warmup_steps=20)
    c.sft.log_every, c.sft.eval_every, c.sft.checkpoint.save_every = 50, 500, 500
    c.sft.eval.update(batch_size=32, num_batches=2, num_samples=4, max_new_tokens=24)

    # ---- stage 2: reward model on the rankings -----------------------------------------------------
    c.rm = rm_configs.get_config("tiny")
    c.rm.data.update(max_len=40, max_prompt_len=16)
    c.rm.batch_size = 16
    c.rm.num_steps = 0  # 0 = rm.num_epochs passes over the rankings
    c.rm.num_epochs = 2
    c.rm.optim.update(learning_rate=1e-3, warmup_steps=10)
    c.rm.log_every, c.rm.eval_every, c.rm.checkpoint.save_every = 10, 50, 200
    c.rm.eval.update(batch_size=16, num_batches=0)

    # ---- stage 3: RL against the RM (section `ppo`: the RL stage's config, configs/ppo.py) ----------
    c.algorithm = "ppo"  # the RL algorithm (rlhf_jax/algorithms/catalog.py): ppo | ppo_penalty | grpo | dr_grpo |
    #                      dapo | gspo | rloo | reinforce_pp | reinforce_pp_baseline | remax. Not ppo: the RL
    #                      stage and its evaluation go to DIR/<algorithm>/, reusing DIR's other stages
    c.ppo = ppo_configs.get_config("tiny")
    c.ppo.num_steps = 100
    c.ppo.critic.init.source = "reward"  # critic from the RM (InstructGPT / DeepSpeed-Chat)
    c.ppo.rewards.rm_weight = 1.0
    c.ppo.rewards.rules.target_token.weight = 0.0  # no rule rewards: the RM is the only reward
    # The policy is the model sampled at temperature 0.5 (PPO's log-probs, the KL and the evaluation
    # all use it): at 1.0 the tiny model's samples are so noisy that SFT and PPO often tie by luck.
    c.ppo.rollout.update(batch_size=64, prompt_len=12, max_new_tokens=24, temperature=0.5, eos_id=1, pad_id=0)
    c.ppo.ppo.update(epochs=2, num_minibatches=2)
    c.ppo.kl.update(coef=0.1, adaptive=False)  # 0.05 over-optimises the RM (experiments/sweep.py)
    # Every algorithm gets the same leash: β = 0.1 on the KL in the reward. (GRPO's own loss-term KL, seed 0:
    # at β 0.1 the policy drifted to KL 6.3, win rate 0.60; at β 0.4, KL 1.7, win 0.66; in the reward, KL 2.1,
    # win 0.76.) --config.ppo.algorithm.kl_in='' restores each algorithm's own placement.
    c.ppo.algorithm.kl_in = "reward"
    c.ppo.actor.optim.update(learning_rate=1e-4)  # 3e-4 collapses onto one answer per kind sooner (lower win rate)
    c.ppo.critic.optim.update(learning_rate=1e-3)
    c.ppo.log_every, c.ppo.checkpoint.save_every = 1, 50

    # ---- stage 3 for the DPO variants (--config.algorithm=dpo | cdpo | ipo | simpo | online_dpo): section
    # `dpo` is configs/dpo.py's; it trains on the rankings stage's data (every ordered pair of each K=4
    # ranking) from SFT, into DIR/<algorithm>/dpo; the RM serves best-of-n and online DPO's ranking only.
    c.dpo = dpo_configs.get_config("tiny")
    c.dpo.dpo.update(loss_type="", label_smoothing=-1.0)  # "" / < 0: the algorithm's loss (rlhf_jax/preference.py)
    c.dpo.data.update(max_len=40, max_prompt_len=16)
    c.dpo.batch_size = 16
    c.dpo.num_steps = 0  # 0 = dpo.num_epochs passes over the rankings
    c.dpo.num_epochs = 2
    c.dpo.optim.update(learning_rate=1e-4, warmup_steps=10)
    c.dpo.log_every, c.dpo.eval_every, c.dpo.checkpoint.save_every = 10, 100, 200
    c.dpo.eval.update(batch_size=16, num_batches=0)
    c.online_dpo = online_dpo_config()

    if preset == "smoke":
        c.instructions.update(n_sft=128, n_sft_eval=16, n_rm_prompts=48, n_rm_heldout=16, n_ppo_prompts=64,
                              n_heldout=16, n_corpus=200)
        c.rankings.update(candidates=8, batch_size=64)
        c.eval.update(num_samples=4, batch_size=64, num_report_samples=4)
        c.pretrain.update(num_steps=4, log_every=2)
        c.pretrain.checkpoint.save_every = 4
        c.sft.update(num_steps=4, log_every=2, eval_every=4)
        c.sft.checkpoint.save_every = 4
        c.sft.eval.update(num_batches=1, num_samples=0)
        c.rm.update(num_steps=2, log_every=1, eval_every=2)
        c.rm.batch_size = 8
        c.rm.eval.batch_size = 8
        c.ppo.num_steps = 2
        c.ppo.rollout.batch_size = 16
        c.dpo.update(num_steps=2, log_every=1, eval_every=2)
        c.dpo.batch_size = 8
        c.dpo.eval.batch_size = 8
        c.online_dpo.update(rounds=2, prompts_per_round=16, steps_per_round=2)
        for stage in (c.pretrain, c.sft, c.rm, c.ppo, c.dpo):
            stage.fast_compile = True  # a few steps each: compile time dominates
    if c.task == "arithmetic":
        arithmetic_stages(c, smoke=preset == "arithmetic_smoke")
    return c


def arithmetic_stages(c: ml_collections.ConfigDict, smoke: bool) -> None:
    """Stage settings of the arithmetic recipe: questions <= 24 tokens with the chat template, worked
    solutions <= 15 tokens with EOS; GRPO on the reward functions, no RM or critic."""
    c.algorithm = "grpo"
    c.pretrain.num_steps = 200
    c.pretrain.checkpoint.save_every = 200
    c.sft.data.update(max_len=40, max_prompt_len=24)
    c.sft.num_steps = 1000
    c.sft.eval.update(max_new_tokens=16)
    # Tuned on seed 0 (README): 64 prompts x 4 responses per iteration; at 16 x 4 the gain stayed <= 0.05
    # (lr 1e-4) or went negative (3e-4, 1e-3). At 64 x 4 and lr 2e-4, β = 0.04 gave +0.149 and β = 0 (as DAPO /
    # Dr. GRPO; kept) +0.144 after 150 iterations. The training reward still rises after 150 (noisy: 0.74 ->
    # ~0.88); 300 iterations on the same three SFT models: +0.208 / +0.170 / +0.225 (150: +0.169 / +0.128 / +0.161).
    c.ppo.num_steps = 300
    c.ppo.reward.init.source = "none"
    c.ppo.critic.init.source = "actor"
    c.ppo.rewards.rm_weight = 0.0
    c.ppo.rewards.functions = c.arithmetic.reward_functions
    c.ppo.rollout.update(batch_size=256, prompt_len=26, max_new_tokens=16, temperature=1.0)  # <bos> + 25 at most
    c.ppo.algorithm.update(group_size=4, kl_in="")  # GRPO's own placement (the loss), β = kl.coef
    c.ppo.kl.coef = 0.0
    c.ppo.ppo.update(epochs=1, num_minibatches=4)
    c.ppo.actor.optim.update(learning_rate=2e-4)
    c.eval.update(num_samples=4, temperature=-1.0)  # k = the group size for pass@k
    if smoke:
        c.arithmetic.update(n_sft=64, n_sft_eval=8, n_ppo_prompts=64, n_heldout=8, n_corpus=64)
        c.pretrain.update(num_steps=2, log_every=1)
        c.pretrain.checkpoint.save_every = 2
        c.sft.update(num_steps=2, log_every=1, eval_every=2)
        c.sft.checkpoint.save_every = 2
        c.sft.eval.update(num_batches=1, num_samples=0)
        c.ppo.update(num_steps=2, log_every=1)
        c.ppo.rollout.batch_size = 16
        c.eval.update(batch_size=32, num_report_samples=2)
        for stage in (c.pretrain, c.sft, c.ppo):
            stage.fast_compile = True
