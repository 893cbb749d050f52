"""The InstructGPT recipe end to end on the built-in task: stage orchestration and evaluation.

    task -> pretrain -> sft -> rankings -> rm -> ppo -> eval        (DIR/<stage>/ for each)

- task:     export the instruction task (demonstrations, prompts, corpus, hidden gold key, tokenizer).
- pretrain: the SFT trainer on the corpus with the loss on every token (a small base model).
- sft:      the SFT trainer on the imperfect demonstrations, from the pretrained model.
- rankings: K distinct SFT samples per RM prompt, gold-scored and ranked by a simulated labeler
            (Plackett-Luce at `rankings.labeler_temperature`); a held-out share of prompts for RM accuracy.
- rm:       the RM trainer on the rankings (ranking loss), from the SFT model.
- ppo:      the PPO trainer: actor and reference from SFT, critic and reward from the RM.
- eval:     held-out prompts: SFT vs PPO samples under the gold judge, best-of-4 reranked by the RM,
            KL to SFT; summary.json, report.md and plots in DIR.
With --config.algorithm=NAME another RL algorithm replaces PPO (DIR/NAME/{rl,eval}), or a DPO variant
(dpo, cdpo, ipo, simpo, online_dpo) trains from SFT on the rankings instead (DIR/NAME/{dpo,eval};
online_dpo samples and ranks its own pairs in rounds: `online_dpo`).

A stage writes `DIR/<stage>/DONE` (JSON: seconds, stage facts) after it completes; a re-run
with the same DIR skips finished stages, and an interrupted stage resumes from its own
checkpoints (the trainers resume from their workdir).

Modules: `layout` (directories, DONE markers, run_stage, stage_configs), `sampling` (prompt sets
with gold examples, models of finished stages, sampling), `rankings` (the rankings stage),
`evaluate` (the eval stage: `evaluate.evaluate`), `online_dpo` (online DPO's rounds), `run` (the
stages, run_pipeline), `sweep`
(the KL sweep and its `--set` overrides).
"""
from rlhf_jax.pipeline.evaluate import eval_temperature, gold_matrix, ranking_scores, rm_heldout_accuracy
from rlhf_jax.pipeline.layout import DONE, STAGES, Layout, mark_done, run_stage, stage_configs, stage_info
from rlhf_jax.pipeline.rankings import collect_ranking_data, distinct_candidates, label_rankings
from rlhf_jax.pipeline.run import (StageInterrupted, check_special_tokens, export_stage, make_gold_scorer,
                                   ppo_stage, run_pipeline)
from rlhf_jax.pipeline.sampling import (PromptSet, Sampling, load_prompt_set, read_prompt_ids, sample_texts,
                                        sampling_settings)
from rlhf_jax.pipeline.sweep import (REUSED_STAGES, SWEEP_COLUMNS, SweepResult, apply_overrides,
                                     load_pipeline_config, parse_override, run_sweep)

__all__ = [
    "DONE", "STAGES", "Layout", "mark_done", "run_stage", "stage_configs", "stage_info",
    "PromptSet", "Sampling", "load_prompt_set", "read_prompt_ids",
    "sample_texts", "sampling_settings",
    "collect_ranking_data", "distinct_candidates", "label_rankings",
    "eval_temperature", "gold_matrix", "ranking_scores", "rm_heldout_accuracy",
    "StageInterrupted", "check_special_tokens", "export_stage", "make_gold_scorer", "ppo_stage", "run_pipeline",
    "REUSED_STAGES", "SWEEP_COLUMNS", "SweepResult", "apply_overrides", "load_pipeline_config", "parse_override",
    "run_sweep",
]
