"""Pipeline outputs: summary.json, report.md and PNG plots (matplotlib, Agg backend, no display).

- `write_summary`: the headline numbers as JSON (non-finite numbers rejected: NaN is not JSON).
- `plot_ppo_curves`: RM reward, gold score, KL and kl_coef against PPO step (metrics.jsonl).
- `plot_rm_accuracy`: RM train / held-out ranking accuracy against step.
- `plot_overoptimization`: gold and RM score against KL to SFT over a sweep (Gao et al. 2022).
- `markdown_table`, `write_report`: a report a person reads in a minute; `kl_note` says what
  `kl_to_sft` estimates and why it can come out slightly negative.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

PathLike = str | os.PathLike

SUMMARY_KEYS = ("sft_gold", "best_of_4_gold", "policy_gold", "rm_heldout_accuracy", "labeler_agreement",
                "kl_to_sft", "win_rate_vs_sft", "wall_seconds")
"""Every key summary.json must carry (all finite numbers)."""

SUMMARY_DESCRIPTIONS = {
    "sft_gold": "mean gold score of SFT samples on held-out prompts",
    "best_of_4_gold": "mean gold score of the RM's pick among 4 SFT samples per prompt",
    "policy_gold": "mean gold score of the RL policy's samples on held-out prompts (ppo_gold for PPO)",
    "rm_heldout_accuracy": "RM pairwise accuracy on held-out labeler rankings",
    "labeler_agreement": "how often two simulated labelers agree on a pair (the bar for the RM)",
    "kl_to_sft": "KL(policy || SFT), nats per response, sampled: mean over held-out prompts of sum_t log pi_policy "
                 "- log pi_sft on policy samples (k1 estimator: unbiased, slightly negative values are sampling noise)",
    "win_rate_vs_sft": "gold judge: policy sample beats SFT sample for the same prompt (ties count 1/2)",
    "wall_seconds": "wall-clock seconds of all stages (as recorded when each finished) and the evaluation",
}

KL_TO_SFT_ESTIMATOR = ("k1: mean over held-out prompts of sum_t (log pi_policy - log pi_sft) on policy samples; "
                       "unbiased for KL(policy || SFT) >= 0, but a Monte-Carlo mean: small negative values are "
                       "sampling noise (kl_to_sft_stderr; kl_to_sft_k3 is the k3 estimate, >= 0 by construction)")
"""summary.json's `kl_to_sft_estimator`: what `kl_to_sft` is (rlhf_jax.rl's KL estimators, Schulman 2020)."""

PPO_CURVES = (("reward/mean", "RM reward"), ("gold/mean", "gold score"), ("kl", "KL to reference"),
              ("kl_coef", "KL coefficient"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# summary.json
# ----------------------------------------------------------------------------------------------
def check_summary(summary: Mapping[str, Any]) -> None:
    """Every SUMMARY_KEYS entry present and a finite number; the error lists all problems."""
    problems = [f"{key}: missing" for key in SUMMARY_KEYS if key not in summary]
    for key in SUMMARY_KEYS:
        if key in summary:
            value = summary[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{key}={value!r} is not a finite number")
    if problems:
        raise ValueError("summary: " + "; ".join(problems))


def write_summary(path: PathLike, summary: Mapping[str, Any]) -> None:
    """Validate and write `summary` as indented JSON (NaN/inf are refused, not written)."""
    check_summary(summary)
    pathlib.Path(path).write_text(json.dumps(dict(summary), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over metric rows that have it with a finite value."""
    points = [(int(r["step"]), float(r[key])) for r in rows
              if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): a readable trend line."""
    if window < 1:
        raise ValueError(f"moving_average window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_with_trend(ax, steps, values, label=None, color=None, window: int = 10) -> None:
    """Raw points faint, a moving average on top when there are enough of them."""
    if len(steps) >= 2 * window:
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
                label=f"{label} (mean of {window})" if label else None)
    else:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, color=color, label=label)


def plot_ppo_curves(rows: Sequence[Mapping[str, Any]], out_path: PathLike) -> list[str]:
    """2x2 panels of PPO_CURVES against step; returns the metric keys that had data."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    plotted = []
    for ax, (key, title) in zip(axes.flat, PPO_CURVES):
        steps, values = series(rows, key)
        if steps:
            _plot_with_trend(ax, steps, values, color="tab:blue")
            plotted.append(key)
        else:
            ax.text(0.5, 0.5, f"'{key}' not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return plotted


def plot_rm_accuracy(rows: Sequence[Mapping[str, Any]], out_path: PathLike,
                     curves: Sequence[tuple[str, str]] = (("accuracy", "train"), ("eval/accuracy", "held-out")),
                     ceiling: float | None = None) -> list[str]:
    """RM ranking accuracy against step, one line per (metric key, label); optional dashed line
    at the labeler-agreement `ceiling`. Returns the keys that had data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = []
    for (key, label), color in zip(curves, ("tab:blue", "tab:orange", "tab:green")):
        steps, values = series(rows, key)
        if steps:
            _plot_with_trend(ax, steps, values, label=label, color=color, window=5)
            plotted.append(key)
    if ceiling is not None:
        ax.axhline(ceiling, linestyle="--", color="gray", label="labeler agreement")
    ax.set_xlabel("RM step")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("Reward model accuracy")
    ax.grid(alpha=0.3)
    if plotted or ceiling is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return plotted


def plot_overoptimization(rows: Sequence[Mapping[str, Any]], out_path: PathLike, *, x: str = "kl_to_sft",
                          gold: str = "policy_gold", rm: str = "ppo_rm_score", label: str = "kl_coef",
                          baseline: tuple[float, float, float] | None = None) -> None:
    """Gold and RM score against KL to SFT, one point per run (Gao et al. 2022, Fig. 1 style).

    The RM score (what PPO optimises) keeps rising with KL while the gold score (what we want)
    peaks and falls: over-optimisation. Two y axes, since the scales differ; points labelled.
    `baseline` = (kl, gold, rm) of the starting policy (SFT: kl 0) starts both curves.
    """
    plt = _pyplot()
    ordered = sorted(rows, key=lambda r: r[x])
    start = [baseline] if baseline is not None else []
    xs = [b[0] for b in start] + [r[x] for r in ordered]
    fig, ax_gold = plt.subplots(figsize=(6.5, 4.5))
    ax_rm = ax_gold.twinx()
    ax_gold.plot(xs, [b[1] for b in start] + [r[gold] for r in ordered], "o-", color="tab:green", label="gold score")
    ax_rm.plot(xs, [b[2] for b in start] + [r[rm] for r in ordered], "s--", color="tab:blue", label="RM score")
    if baseline is not None:
        ax_gold.annotate("SFT", (baseline[0], baseline[1]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    for i, r in enumerate(ordered):  # alternate above / below so neighbouring labels do not overlap
        ax_gold.annotate(f"{label}={r[label]:g}", (r[x], r[gold]), textcoords="offset points",
                         xytext=(4, 6 if i % 2 == 0 else -12), fontsize=8)
    ax_gold.set_xlabel("KL to SFT (nats per response)")
    ax_gold.set_ylabel("gold score", color="tab:green")
    ax_rm.set_ylabel("RM score", color="tab:blue")
    ax_gold.set_title("Over-optimisation: gold vs RM score as the policy drifts from SFT")
    handles = ax_gold.get_legend_handles_labels()[0] + ax_rm.get_legend_handles_labels()[0]
    # below the axes: inside, it covers points of one curve or the other (each axis places its own)
    ax_gold.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.14),
                   ncol=2, frameon=False)
    ax_gold.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Tables and report.md
# ----------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """GitHub markdown table of `columns` over `rows` (floats to 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_value(row.get(c, "")).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def samples_markdown(samples: Sequence[Mapping[str, Any]], policy: str = "PPO") -> str:
    """Before/after table: prompt, SFT response (gold), the RL `policy`'s response (gold)."""
    column = f"{policy} response"
    rows = [{"prompt": s["prompt"], "SFT response": f"{s['sft'] or '(empty)'} ({s['sft_gold']:.2f})",
             column: f"{s['ppo'] or '(empty)'} ({s['ppo_gold']:.2f})"} for s in samples]
    return markdown_table(rows, ("prompt", "SFT response", column))


def standard_error(values) -> float:
    """Standard error of the mean of `values` (sample std, ddof 1, / sqrt(n)); 0 for fewer than 2."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def kl_note(summary: Mapping[str, Any]) -> str:
    """What `kl_to_sft` is, with its standard error and k3 estimate when the summary has them, and
    what a negative value means (sampling noise, unless it is many standard errors below 0)."""
    kl, stderr, k3 = summary["kl_to_sft"], summary.get("kl_to_sft_stderr"), summary.get("kl_to_sft_k3")
    note = ("kl_to_sft is a sampled estimate of KL(policy || SFT) in nats per response: the mean over held-out "
            "prompts of sum_t (log pi_policy - log pi_sft) on the policy's own samples (the k1 estimator, as the RL "
            "stage's `kl`). It is unbiased, but single terms can be negative")
    if stderr is not None:
        note += f"; its standard error over prompts is {stderr:.3f}"
    if k3 is not None:
        note += f"; the k3 estimate (r - 1 - log r per token, >= 0 by construction) is {k3:.3f}"
    note += "."
    if kl < 0 and stderr and kl < -3 * stderr:
        note += (f" The value here, {kl:.3f}, is {-kl / stderr:.1f} standard errors below 0, more than sampling noise "
                 "explains: check that the policy's samples and both log-probs used the same temperature.")
    elif kl < 0:
        note += (f" The value here, {kl:.3f}, is below 0, which the true KL never is: a small negative estimate is "
                 "sampling noise (the policy is too close to SFT for this many samples to tell the two apart).")
    return note


def write_report(path: PathLike, summary: Mapping[str, Any], samples: Sequence[Mapping[str, Any]],
                 plots: Mapping[str, str], notes: Sequence[str] = ()) -> None:
    """report.md: headline table, a few before/after samples, the plots (paths relative to it)."""
    check_summary(summary)
    metric_rows = [{"metric": key, "value": summary[key], "meaning": SUMMARY_DESCRIPTIONS[key]}
                   for key in SUMMARY_KEYS]
    algorithm = summary.get("algorithm", "ppo").upper()
    kl_error = f" ± {summary['kl_to_sft_stderr']:.2f}" if "kl_to_sft_stderr" in summary else ""
    parts = [
        f"# RLHF pipeline report ({algorithm})\n",
        f"{algorithm} vs SFT on held-out prompts (gold judge): win rate **{summary['win_rate_vs_sft']:.2f}**, "
        f"gold **{summary['sft_gold']:.3f} -> {summary['policy_gold']:.3f}** "
        f"(best-of-4 reranked by the RM: {summary['best_of_4_gold']:.3f}), at KL "
        f"{summary['kl_to_sft']:.2f}{kl_error} nats from SFT (sampled estimate). The reward model agrees with "
        f"held-out labeler rankings {summary['rm_heldout_accuracy']:.1%} of the time; two labelers agree "
        f"{summary['labeler_agreement']:.1%}.\n",
        "## Numbers\n",
        markdown_table(metric_rows, ("metric", "value", "meaning")),
        *[f"- {note}\n" for note in (kl_note(summary), *notes)],
        f"## Samples before / after {algorithm}\n",
        "Gold score in parentheses.\n",
        samples_markdown(samples, algorithm),
        "## Plots\n",
        *[f"### {title}\n\n![{title}]({file})\n" for title, file in plots.items()],
    ]
    pathlib.Path(path).write_text("\n".join(parts))
