"""Over-optimisation sweep: PPO + eval per KL coefficient on one finished pipeline's SFT and RM
(Gao et al. 2022), with `--set key=value` overrides of the pipeline config."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Callable

import ml_collections
import numpy as np

from rlhf_jax import report
from rlhf_jax.trainers import setup
from rlhf_jax.pipeline.evaluate import evaluate
from rlhf_jax.pipeline.layout import Layout, run_stage, stage_configs, stage_info
from rlhf_jax.pipeline.run import ppo_stage

REUSED_STAGES = ("task", "pretrain", "sft", "rankings", "rm")
SWEEP_COLUMNS = ("kl_coef", "kl_to_sft", "policy_gold", "ppo_rm_score", "win_rate_vs_sft", "sft_gold", "sft_rm_score",
                 "best_of_4_gold", "ppo_length", "wall_seconds")


# ----------------------------------------------------------------------------------------------
# Overrides of the pipeline config
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """"a.b=value" -> ("a.b", value); the value is a Python literal when it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value (e.g. ppo.num_steps=200)")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def apply_overrides(config, overrides: list[str]):
    """A copy of `config` with `--set` overrides applied; keys must exist and may not touch the
    reused stages (their results would not change)."""
    config = config.copy_and_resolve_references()
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".")[0]
        if head in REUSED_STAGES or head in ("pretrain",):
            raise ValueError(f"--set {key}: the sweep reuses the finished '{head}' stage, so this override would have "
                             f"no effect; run experiments/run_pipeline.py with --config.{key}=... in a new workdir")
        parent, _, leaf = key.rpartition(".")
        section = config
        for part in [p for p in parent.split(".") if p]:
            if part not in section:
                raise ValueError(f"--set {key}: config has no field {part!r} here (fields: {sorted(section.keys())})")
            section = section[part]
        if leaf not in section:
            raise ValueError(f"--set {key}: config has no field {leaf!r} (fields: {sorted(section.keys())})")
        try:
            section[leaf] = value
        except TypeError as err:
            raise ValueError(f"--set {key}={value!r}: {err}") from err
    return config


def load_pipeline_config(workdir: str | pathlib.Path):
    """The resolved pipeline config a workdir was run with (DIR/config.json)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run experiments/run_pipeline.py --workdir {workdir} first")
    return ml_collections.ConfigDict(setup.settings_of(json.loads(path.read_text())))


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepResult:
    directory: pathlib.Path
    rows: list
    table: str


def sweep_name(overrides: list[str]) -> str:
    """The sub-directory of DIR/sweep/ for a list of `--set` overrides when `--name` is not given:
    "base" for none, else the overrides themselves ("ppo.actor.optim.learning_rate=0.0003,ppo.ppo.epochs=4",
    sorted); characters outside [A-Za-z0-9._=+,-] become "_" and a name over 80 characters is cut, with
    8 hex digits of a hash of the exact overrides appended in both cases so distinct sets never share one."""
    if not overrides:
        return "base"
    text = ",".join(sorted(overrides))
    slug = re.sub(r"[^A-Za-z0-9._=+,-]", "_", text)
    if slug == text and len(slug) <= 80:
        return slug
    return slug[:80] + "-" + hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def run_sweep(workdir: str | pathlib.Path, kl_coefs: list[float], overrides: list[str] = (), name: str = "",
              echo: Callable[[str], None] = print) -> SweepResult:
    """PPO + evaluation for each KL coefficient, reusing the workdir's finished stages; writes the
    table (markdown + CSV) and the over-optimisation plot into DIR/sweep/<name>/."""
    layout = Layout(pathlib.Path(workdir).absolute())
    unfinished = [s for s in REUSED_STAGES if stage_info(layout.stage(s)) is None]
    if unfinished:
        raise ValueError(f"{layout.root}: stages {unfinished} have not finished; run experiments/run_pipeline.py "
                         f"--workdir {workdir} first")
    if not kl_coefs or any(not np.isfinite(c) or c < 0 for c in kl_coefs):
        raise ValueError(f"--kl_coefs must be finite numbers >= 0, got {kl_coefs}")
    base = apply_overrides(load_pipeline_config(layout.root), list(overrides))
    labeler_agreement = stage_info(layout.stage("rankings"))["info"]["labeler_agreement"]
    directory = layout.root / "sweep" / (name or sweep_name(list(overrides)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "overrides.json").write_text(json.dumps(list(overrides), indent=2) + "\n")

    rows = []
    for coef in kl_coefs:
        run_dir = directory / f"kl_{coef:g}"
        config = base.copy_and_resolve_references()
        config.ppo.kl.coef = float(coef)
        ppo_config = stage_configs(config, layout)["ppo"]
        ppo_record = run_stage(f"ppo kl={coef:g}", run_dir / "ppo",
                               lambda: ppo_stage(config, layout, ppo_config, run_dir / "ppo"), echo)
        run_stage(f"eval kl={coef:g}", run_dir / "eval", lambda: evaluate(
            config, layout, run_dir / "ppo", run_dir, labeler_agreement=labeler_agreement,
            prior_seconds=ppo_record["seconds"], echo=echo), echo)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"kl_coef": float(coef), **summary})

    rows.sort(key=lambda r: r["kl_to_sft"])
    table = report.markdown_table(rows, SWEEP_COLUMNS)
    (directory / "sweep.md").write_text(
        f"# KL sweep ({layout.root})\n\nOverrides: {list(overrides) or 'none'}. One row per KL coefficient, "
        f"sorted by the measured KL to SFT.\n\n{table}\n![over-optimisation](overoptimization.png)\n")
    report.write_csv(directory / "sweep.csv", rows, SWEEP_COLUMNS)
    report.plot_overoptimization(rows, directory / "overoptimization.png",
                                 baseline=(0.0, rows[0]["sft_gold"], rows[0]["sft_rm_score"]))
    return SweepResult(directory=directory, rows=rows, table=table)
