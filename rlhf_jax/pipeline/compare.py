"""A controlled comparison of RL algorithms (and the DPO variants) on the built-in task, judged by the
hidden gold oracle.

For each seed one pipeline workdir (DIR/seed<N>): the task, pretraining, SFT, rankings and RM run
once and every algorithm starts from that SFT model and that RM, samples the same number of
responses (rollout.batch_size x ppo.num_steps) and is evaluated on the same held-out prompts. The
DPO variants train from the same SFT model on the rankings stage's data (offline) or on their own
samples (online_dpo); comparison.md says how many.
Writes DIR/comparison.md, DIR/comparison.csv (mean and spread over seeds per algorithm) and two
plots: gold score against sampled responses (from each run's `gold/mean` curve) and gold score
against KL to SFT (one point per run).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import numpy as np

from rlhf_jax import metrics, preference, report
from rlhf_jax.algorithms import ALGORITHMS
from rlhf_jax.pipeline.layout import Layout, stage_info
from rlhf_jax.pipeline.run import policy_dirs, run_pipeline

COLUMNS = ("policy_gold", "win_rate_vs_sft", "kl_to_sft", "ppo_rm_score", "ppo_length", "rl_seconds")
TABLE_COLUMNS = ("algorithm", "seeds", *[f"{c} {stat}" for c in COLUMNS for stat in ("mean", "spread")])


@dataclasses.dataclass
class Comparison:
    directory: pathlib.Path
    runs: list  # one dict per (algorithm, seed): the summary plus rl_seconds
    rows: list  # one dict per algorithm: mean and spread of COLUMNS over seeds
    table: str


def check_algorithms(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in ALGORITHMS and n not in preference.VARIANTS]
    if unknown or not names:
        raise ValueError(f"--algorithms: unknown {unknown} (allowed: {', '.join([*ALGORITHMS, *preference.VARIANTS])})"
                         if unknown
                         else "--algorithms is empty")


def aggregate_runs(runs: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Per algorithm: number of seeds, mean and spread (half the max − min range) of COLUMNS."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["algorithm"] == name]
        row = {"algorithm": name, "seeds": len(mine)}
        for column in COLUMNS:
            values = np.array([r[column] for r in mine], np.float64)
            row[f"{column} mean"] = float(values.mean())
            row[f"{column} spread"] = float((values.max() - values.min()) / 2)
        rows.append(row)
    return rows


def gold_curve(rl_dir: pathlib.Path, responses_per_step: int) -> tuple[list[int], list[float]]:
    """(responses sampled so far, gold/mean of that iteration's responses) of one RL run."""
    steps, gold = report.series(metrics.read_metrics(rl_dir), "gold/mean")
    return [s * responses_per_step for s in steps], gold


def _save(plt, fig, ax, xlabel: str, ylabel: str, path: pathlib.Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(runs: Sequence[dict], curves: dict, out_dir: pathlib.Path) -> dict[str, str]:
    """gold vs sampled responses (smoothed, one line per run) and gold vs KL to SFT (points)."""
    plt = report._pyplot()
    names = list(dict.fromkeys(r["algorithm"] for r in runs))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, seed), (x, y) in curves.items():
        if x:
            ax.plot(x, report.moving_average(y, 10), color=colours[name], alpha=0.8,
                    label=name if seed == min(s for n, s in curves if n == name) else None)
    _save(plt, fig, ax, "sampled responses", "gold score of the rollout (moving average)",
          out_dir / "gold_vs_samples.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        mine = [r for r in runs if r["algorithm"] == name]
        ax.scatter([r["kl_to_sft"] for r in mine], [r["policy_gold"] for r in mine], color=colours[name], label=name)
    sft = np.mean([r["sft_gold"] for r in runs])
    ax.axhline(sft, color="gray", linestyle=":", label="SFT")
    _save(plt, fig, ax, "KL to SFT (nats per response, held-out prompts)", "gold score (held-out prompts)",
          out_dir / "gold_vs_kl.png")
    return {"Gold score of each iteration's responses against responses sampled": "gold_vs_samples.png",
            "Held-out gold score against KL to SFT, one point per run": "gold_vs_kl.png"}


def dpo_note(config, names: Sequence[str]) -> list[str]:
    """What the DPO variants in `names` train on instead of RL rollouts (a line for comparison.md)."""
    offline = [n for n in names if n in preference.VARIANTS and not preference.VARIANTS[n][2]]
    online = [n for n in names if n in preference.VARIANTS and preference.VARIANTS[n][2]]
    lines = []
    if offline:
        lines.append(f"{', '.join(offline)}: offline, on the rankings stage's labeler rankings (every ordered pair "
                     f"of each K={config.rankings.num_responses} ranking, {config.dpo.num_epochs} epochs or "
                     f"{config.dpo.num_steps} steps), no sampling; rl_seconds is the DPO stage's wall time.\n")
    if online:
        o = config.online_dpo
        lines.append(f"{', '.join(online)}: {o.rounds} rounds x {o.prompts_per_round} prompts x {o.num_responses} "
                     f"samples from the current policy ({o.rounds * o.prompts_per_round * o.num_responses} "
                     f"responses), ranked by the {'reward model' if o.ranker == 'rm' else 'simulated labelers'}.\n")
    return lines


def run_comparison(config, workdir: str | pathlib.Path, names: Sequence[str], seeds: Sequence[int],
                   echo: Callable[[str], None] = print) -> Comparison:
    """Every algorithm on every seed (finished runs are reused), then the table and the plots."""
    check_algorithms(names)
    directory = pathlib.Path(workdir).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    runs, curves = [], {}
    responses_per_step = config.ppo.rollout.batch_size
    for seed in seeds:
        for name in names:
            run_config = config.copy_and_resolve_references()
            run_config.seed, run_config.algorithm = int(seed), name
            layout = Layout(directory / f"seed{seed}")
            echo(f"== {name}, seed {seed} ==")
            summary = run_pipeline(run_config, layout.root, echo)
            rl_dir, _, _ = policy_dirs(layout, name)
            rl_seconds = stage_info(rl_dir)["seconds"]
            runs.append({**summary, "algorithm": name, "seed": int(seed), "rl_seconds": rl_seconds})
            if name not in preference.VARIANTS:  # the DPO variants log no gold/mean per step
                curves[(name, int(seed))] = gold_curve(rl_dir, responses_per_step)
    rows = aggregate_runs(runs, names)
    table = report.markdown_table(rows, TABLE_COLUMNS)
    plots = plot_comparison(runs, curves, directory)
    report.write_csv(directory / "comparison.csv", runs, ("algorithm", "seed", "sft_gold", *COLUMNS))
    samples = config.ppo.rollout.batch_size * config.ppo.num_steps
    text = [f"# RL algorithms on the built-in task ({directory})\n",
            f"Seeds {list(seeds)}; per seed one SFT model and one reward model shared by every algorithm; "
            f"each algorithm samples {samples} responses ({config.ppo.num_steps} iterations x "
            f"{config.ppo.rollout.batch_size}). Held-out gold score, win rate against SFT (ties 1/2), KL to "
            "SFT, normalised RM score and response length (words) of the trained policy; rl_seconds is the RL "
            "stage's wall time. Mean and spread (half the max - min range) over seeds.\n",
            *dpo_note(config, names), table, "",
            *[f"## {title}\n\n![{title}]({file})\n" for title, file in plots.items()]]
    (directory / "comparison.md").write_text("\n".join(text))
    return Comparison(directory=directory, runs=runs, rows=rows, table=table)
