"""Where the stages of one pipeline run live, the DONE markers that make a re-run skip them, and
the stage configs that point each stage at the files of the stages before it.

A stage writes `DIR/<stage>/DONE` (JSON: seconds, stage facts, settings) after it completes; a
re-run with the same DIR skips finished stages, and an interrupted stage resumes from its own
checkpoints (the trainers resume from their workdir).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping

DONE = "DONE"
STAGES = ("task", "pretrain", "sft", "rankings", "rm", "ppo", "eval")


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------
def stage_info(stage_dir: str | pathlib.Path) -> dict | None:
    """The DONE record of a finished stage, or None when the stage has not completed."""
    marker = pathlib.Path(stage_dir) / DONE
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{marker}: unreadable stage marker ({err}); delete it to re-run the stage") from err


def mark_done(stage_dir: str | pathlib.Path, record: Mapping[str, Any]) -> None:
    """Write the DONE marker atomically (write a temp file, then rename)."""
    stage_dir = pathlib.Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{DONE}.tmp"
    tmp.write_text(json.dumps(dict(record), indent=2, allow_nan=False) + "\n")
    tmp.rename(stage_dir / DONE)


def run_stage(name: str, stage_dir: str | pathlib.Path, fn: Callable[[], Mapping[str, Any] | None],
              echo: Callable[[str], None] = print, settings: Mapping[str, Any] | None = None) -> dict:
    """Run `fn()` unless `stage_dir` has a DONE marker; returns the DONE record.

    The record is {"stage", "seconds", "info", "settings"}: info is what `fn` returned (JSON-able
    facts later stages need, e.g. the labeler agreement), settings the config the stage ran with.
    A finished stage whose recorded settings differ from `settings` is still skipped, with a
    warning: its results stand until its directory is deleted.
    """
    done = stage_info(stage_dir)
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str)) if settings is not None else None
    if done is not None:
        echo(f"[{name}] done already ({done['seconds']:.0f}s when it ran): skipping")
        if settings is not None and done.get("settings") not in (None, settings):
            echo(f"[{name}] WARNING: the config of this stage changed since it ran; its old results are used. "
                 f"Delete {stage_dir} to run it again with the new settings.")
        return done
    echo(f"[{name}] running in {stage_dir}")
    start = time.perf_counter()
    info = dict(fn() or {})
    record = {"stage": name, "seconds": time.perf_counter() - start, "info": info, "settings": settings}
    mark_done(stage_dir, record)
    echo(f"[{name}] finished in {record['seconds']:.0f}s")
    return record


# ----------------------------------------------------------------------------------------------
# Directory layout
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every stage of one pipeline run lives under its workdir."""

    root: pathlib.Path

    def stage(self, name: str) -> pathlib.Path:
        if name not in STAGES:
            raise ValueError(f"unknown pipeline stage {name!r} (stages: {STAGES})")
        return self.root / name

    @property
    def task(self) -> pathlib.Path:
        return self.stage("task")

    def task_file(self, name: str) -> str:
        return str(self.task / name)

    @property
    def tokenizer(self) -> str:
        return self.task_file("tokenizer")

    @property
    def rankings_train(self) -> str:
        return str(self.stage("rankings") / "rankings_train.jsonl")

    @property
    def rankings_heldout(self) -> str:
        return str(self.stage("rankings") / "rankings_heldout.jsonl")

    @property
    def data_cache(self) -> str:
        return str(self.root / "data_cache")


# ----------------------------------------------------------------------------------------------
# Stage configs: the pipeline's stage sections plus the paths that tie the stages together
# ----------------------------------------------------------------------------------------------
def stage_configs(config, layout: Layout) -> dict:
    """{stage: ConfigDict} for pretrain, sft, rm, ppo and dpo, with data files, tokenizer, init /
    checkpoint paths, the shared TFDS cache and `seed` filled in (copies; `config` is unchanged)."""
    tokenizer, cache = layout.tokenizer, layout.data_cache
    pretrain = config.pretrain.copy_and_resolve_references()
    pretrain.seed = config.seed
    pretrain.data.update(kind="text", train=layout.task_file("corpus.txt"), eval="", tokenizer=tokenizer,
                         cache_dir=cache)
    pretrain.init.update(source="scratch", path="")

    sft = config.sft.copy_and_resolve_references()
    sft.seed = config.seed
    sft.data.update(kind="demonstrations", train=layout.task_file("sft.jsonl"),
                    eval=layout.task_file("sft_eval.jsonl"), tokenizer=tokenizer, cache_dir=cache)
    sft.init.update(source="checkpoint", path=str(layout.stage("pretrain")))

    rm = config.rm.copy_and_resolve_references()
    rm.seed = config.seed
    rm.data.update(kind="rankings", train=layout.rankings_train, eval=layout.rankings_heldout, tokenizer=tokenizer,
                   cache_dir=cache)
    rm.init.update(source="checkpoint", path=str(layout.stage("sft")))

    ppo = config.ppo.copy_and_resolve_references()
    ppo.seed = config.seed
    ppo.algorithm.name = config.get("algorithm", "ppo")
    ppo.actor.init.update(source="checkpoint", path=str(layout.stage("sft")))
    ppo.reward.init.update(source="checkpoint", path=str(layout.stage("rm")))
    ppo.data.update(prompts=layout.task_file("ppo_prompts.jsonl"), tokenizer=tokenizer, cache_dir=cache,
                    ptx=layout.task_file("corpus.txt") if ppo.ptx.coef else "")
    dpo = config.dpo.copy_and_resolve_references()
    dpo.seed = config.seed
    dpo.variant = config.get("algorithm", "ppo")
    dpo.data.update(kind="rankings", train=layout.rankings_train, eval=layout.rankings_heldout, tokenizer=tokenizer,
                    cache_dir=cache)
    dpo.init.update(source="checkpoint", path=str(layout.stage("sft")))
    return {"pretrain": pretrain, "sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo}
