"""The verifiable-reward recipe on the built-in arithmetic task (`config.task="arithmetic"`):

    task -> pretrain -> sft -> RL with reward functions (no rankings, no RM) -> eval

- task:     `tasks.arithmetic.export_arithmetic`: GSM8K-format files (worked solutions ending in
            "#### <answer>"), the corpus and the word-level tokenizer.
- pretrain, sft: the SFT trainer on the corpus, then on the (imperfect) demonstrations.
- RL:       `config.algorithm` (GRPO by default) with `config.arithmetic.reward_functions` as the
            reward (exact match + format), run by the RL trainer's host-reward step.
- eval:     held-out problems, `eval.num_samples` samples each from SFT and the policy at the
            rollout temperature, plus one greedy answer each: exact-match accuracy, unbiased pass@k
            for k = 1 and k = num_samples, the format rate and the response length; summary.json and
            report.md in the algorithm's directory.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from rlhf_jax import loading, report
from rlhf_jax.pipeline.layout import Layout, run_stage, stage_configs
from rlhf_jax.pipeline.sampling import PromptSet, sample_texts, sampling_settings
from rlhf_jax.tasks import answers, arithmetic
from rlhf_jax.trainers import sft


def export_stage(config, layout: Layout) -> dict:
    a = config.arithmetic
    paths = arithmetic.export_arithmetic(layout.task, seed=config.seed, n_sft=a.n_sft, n_sft_eval=a.n_sft_eval,
                                         n_rl=a.n_ppo_prompts, n_heldout=a.n_heldout, n_corpus=a.n_corpus,
                                         num_ops=(a.min_ops, a.max_ops), max_value=a.max_value,
                                         error_rate=a.error_rate)
    return {"files": sorted(paths)}


def rl_config(config, layout: Layout):
    """The RL stage's config: `stage_configs`' wiring, with the task's prompts and reward functions
    and no reward model."""
    ppo = stage_configs(config, layout)["ppo"]
    ppo.reward.init.update(source="none", path="")
    ppo.rewards.rm_weight = 0.0
    ppo.rewards.functions = config.arithmetic.reward_functions
    return ppo


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def grade(texts: list[list[str]], gold: list[str]) -> np.ndarray:
    """`[R, S]` 1.0 where sample s of problem r has the gold final answer (`answers.exact_match`)."""
    return np.array([answers.exact_match(None, row, answer=[g] * len(row)) for row, g in zip(texts, gold)])


def policy_metrics(prefix: str, texts: list[list[str]], greedy: list[list[str]], gold: list[str]) -> dict:
    """Accuracy (mean over samples = pass@1), pass@k for k = num_samples, greedy accuracy, format rate
    and mean length in words of one policy's held-out answers."""
    correct, k = grade(texts, gold), len(texts[0])
    flat = [t for row in texts for t in row]
    return {f"{prefix}_accuracy": float(correct.mean()),
            f"{prefix}_pass@1": answers.mean_pass_at_k(correct, 1),
            f"{prefix}_pass@{k}": answers.mean_pass_at_k(correct, k),
            f"{prefix}_greedy_accuracy": float(grade(greedy, gold).mean()),
            f"{prefix}_format": float(np.mean(answers.answer_format(None, flat))),
            f"{prefix}_length": float(np.mean([len(t.split()) for t in flat]))}


def load_heldout(config, layout: Layout, tokenizer) -> tuple[PromptSet, list[str]]:
    """Held-out problems tokenized as the RL trainer does, and their gold answers (row-aligned)."""
    from rlhf_jax import data  # late: TensorFlow-Datasets
    from rlhf_jax.data.prompt_fields import read_prompt_rows

    path = layout.task_file("heldout.jsonl")
    split = data.load_split("prompts", path, tokenizer, max_len=config.ppo.rollout.prompt_len,
                            data_dir=layout.data_cache)
    batch = split.collate(np.arange(len(split)))
    _, fields = read_prompt_rows(path).take(batch["index"])
    return PromptSet(batch["prompt_ids"], batch["prompt_mask"], fields["answer"]), fields["answer"]


def evaluate(config, layout: Layout, rl_dir: pathlib.Path, out_dir: pathlib.Path, prior_seconds: float,
             echo: Callable[[str], None] = print) -> dict:
    start = time.perf_counter()
    cfg, algorithm = config.eval, config.algorithm
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = loading.load_tokenizer(layout.tokenizer)
    prompts, gold = load_heldout(config, layout, tokenizer)
    temperature = config.ppo.rollout.temperature if cfg.temperature < 0 else cfg.temperature
    sampling = sampling_settings(config, tokenizer, temperature, cfg.batch_size)
    greedy = sampling_settings(config, tokenizer, 0.0, cfg.batch_size)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 29)
    summary, texts = {}, {}
    for i, (prefix, stage_dir) in enumerate((("sft", layout.stage("sft")), ("policy", rl_dir))):
        model, params = loading.load_model(stage_dir, heads=("lm",))
        _, sampled = sample_texts(model, params, prompts, jax.random.fold_in(rng, i), cfg.num_samples, sampling,
                                  tokenizer)
        _, argmax = sample_texts(model, params, prompts, jax.random.fold_in(rng, 10 + i), 1, greedy, tokenizer)
        summary.update(policy_metrics(prefix, sampled, argmax, gold))
        texts[prefix] = sampled
    summary.update({"accuracy_gain": summary["policy_accuracy"] - summary["sft_accuracy"],
                    "num_prompts": len(gold), "num_samples": int(cfg.num_samples), "temperature": float(temperature),
                    "seed": int(config.seed), "algorithm": algorithm, "task": "arithmetic"})
    rl_rows = [json.loads(line) for line in open(rl_dir / "metrics.jsonl")]
    reward_ms = [1000 * r["time/reward"] for r in rl_rows[1:] if "time/reward" in r]
    step_ms = [1000 * r["time/step"] for r in rl_rows[1:] if "time/step" in r]
    if reward_ms and step_ms:
        summary.update(host_reward_ms=float(np.median(reward_ms)), iteration_ms=float(np.median(step_ms)),
                       host_reward_share=float(np.median(reward_ms) / np.median(step_ms)))
    summary["wall_seconds"] = float(prior_seconds + time.perf_counter() - start)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r, answer in enumerate(gold):
            f.write(json.dumps({"answer": answer, "sft": texts["sft"][r], "policy": texts["policy"][r]}) + "\n")
    rows = [{"metric": key, "value": value} for key, value in summary.items()]
    (out_dir / "report.md").write_text(
        f"# Verifiable rewards: {algorithm.upper()} on arithmetic\n\nHeld-out exact-match accuracy "
        f"{summary['sft_accuracy']:.3f} (SFT) -> {summary['policy_accuracy']:.3f} ({algorithm.upper()}), "
        f"{len(gold)} problems x {cfg.num_samples} samples at temperature {temperature:g}.\n\n"
        + report.markdown_table(rows, ("metric", "value")))
    echo(f"[eval] accuracy {summary['sft_accuracy']:.3f} -> {summary['policy_accuracy']:.3f}, pass@"
         f"{cfg.num_samples} {summary[f'sft_pass@{cfg.num_samples}']:.3f} -> "
         f"{summary[f'policy_pass@{cfg.num_samples}']:.3f}")
    return summary


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------
def run_arithmetic(config, layout: Layout, dirs: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
                   echo: Callable[[str], None] = print) -> dict:
    """Every unfinished stage in order (DIR/task, pretrain, sft; the RL run and eval in `dirs` =
    `run.policy_dirs`); returns the summary."""
    from rlhf_jax.pipeline.run import _trained, check_special_tokens
    from rlhf_jax.trainers import ppo  # late: TensorFlow-Datasets

    rl_dir, eval_dir, out_dir = dirs
    cfgs = stage_configs(config, layout)
    records = {"task": run_stage("task", layout.task, lambda: export_stage(config, layout), echo,
                                 {"seed": config.seed, **config.arithmetic.to_dict()})}
    check_special_tokens(config, loading.load_tokenizer(layout.tokenizer))
    for name in ("pretrain", "sft"):
        records[name] = run_stage(name, layout.stage(name), lambda: _trained(
            name, sft.train(cfgs[name], str(layout.stage(name)))), echo, cfgs[name].to_dict())
    rl = rl_config(config, layout)
    records["rl"] = run_stage(config.algorithm, rl_dir, lambda: _trained(config.algorithm, ppo.train(rl, str(rl_dir))),
                              echo, rl.to_dict())
    prior = sum(r["seconds"] for r in records.values())
    run_stage("eval", eval_dir, lambda: evaluate(config, layout, rl_dir, out_dir, prior, echo), echo,
              {"seed": config.seed, **config.eval.to_dict()})
    return json.loads((out_dir / "summary.json").read_text())


def check_task(config) -> None:
    """config.task names a built-in task, and the arithmetic task runs with its preset's stage settings."""
    if config.task not in ("instructions", "arithmetic"):
        raise ValueError(f"config.task={config.task!r} (allowed: 'instructions', 'arithmetic')")
    if config.task == "arithmetic" and not str(config.get("preset", "")).startswith("arithmetic"):
        raise ValueError(f"config.task='arithmetic' with the {config.get('preset')!r} preset, whose stage settings "
                         "are the instruction task's: use --config configs/pipeline.py:arithmetic (run_pipeline.py "
                         "picks it when --config is left out)")
