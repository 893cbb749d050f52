"""Export a run to a Hugging Face directory that `transformers` uses at once.

    python experiments/export_hf.py --workdir runs/sft --out exported/sft   # policy: AutoModelForCausalLM
    python experiments/export_hf.py --workdir runs/rm  --out exported/rm    # RM: AutoModelForSequenceClassification
    python experiments/export_hf.py --workdir runs/sft_lora --out exported/adapters --adapters   # PEFT adapters

A policy (an SFT, pretraining or RL run: `heads=("lm",)`) becomes `*ForCausalLM` with its tokenizer
and a `generation_config.json` carrying the eos / pad / bos ids, so `generate` stops at our EOS.
A reward model (`heads=("value",)`) becomes a 1-label `*ForSequenceClassification`. transformers
pools that score at the last token that is not `pad_token_id`; we read it at the last real token
of `attention_mask`, which for our data is the response's EOS. When the tokenizer pads with its
EOS (GPT-2 style) or has no pad token, the export adds a pad token `<|pad|>` to the tokenizer (and,
when the model has no spare row for it, one zero row to the embedding, which no real token reads)
so right-padded batches score the same in both. transformers' score is the *raw* value-head output;
ours is normalised, (raw - mean) / std, with the mean and std written to config.json as
`rlhf_jax_reward_norm`.

A LoRA run exports merged by default (a plain model, `lora.merge`); `export_peft` (`--adapters`)
writes its adapters alone in the PEFT format instead (`lora.save_peft`), to load with
`peft.PeftModel.from_pretrained(<the base exported or downloaded as a transformers model>, out)`.

Never overwrites another directory's files: `--out` must be new or empty, or an earlier export of
the same run (it holds our `export.json`).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax.numpy as jnp

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import loading
from rlhf_jax.data import chat
from rlhf_jax.models import Transformer, save_pretrained

EXPORT_FILE = "export.json"
ADDED_PAD = "<|pad|>"


class ExportError(ValueError):
    """An output directory that holds other files, or an export that cannot be made (one line naming
    the path and what to do)."""


def check_out_dir(out: str | pathlib.Path, source: dict | None = None) -> None:
    """ExportError unless `out` is new, empty, or (given the `source` record of a run) an earlier
    export of that same run: never write into a directory of someone else's files."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = out / EXPORT_FILE
    try:
        record = json.loads(earlier.read_text()) if earlier.is_file() else None
    except (OSError, ValueError):
        record = None
    if (source is None or record is None or record.get("run_id") != source.get("run_id")
            or record.get("workdir") != source["workdir"]):
        what = "an export of another run" if record is not None else "files not written by an export of this run"
        raise ExportError(f"--out {out} is not empty ({what}); nothing was written: give a new or empty directory")


def run_source(workdir: pathlib.Path, meta: dict) -> dict:
    """What an export records of the run it came from: workdir, run id (WORKDIR/run.json) and stage."""
    run = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").is_file() else {}
    return {"workdir": str(workdir.absolute()), "run_id": run.get("run_id"), "stage": meta.get("stage")}


def find_tokenizer(workdir: str | pathlib.Path, tokenizer: str | None = None):
    """`tokenizer` when given, else the run's (loading.run_tokenizer_dir); ExportError naming
    --tokenizer when it has none."""
    directory = tokenizer or loading.run_tokenizer_dir(workdir)
    if directory is None:
        raise ExportError(f"{workdir}: no tokenizer (no tokenizer/ in the workdir, none recorded with its checkpoint); "
                          "give the one it was trained with: --tokenizer DIR")
    return loading.load_tokenizer(directory)


def reward_pad(model: Transformer, params: dict, tokenizer) -> tuple[Transformer, dict, int]:
    """(model, params, pad id) for scoring right-padded batches in transformers the way we do: the
    tokenizer's pad id when it is a real pad (not None, not EOS); else a new pad token `<|pad|>` is
    added to `tokenizer` (in place), with a zero embedding row appended when its id is outside the
    model's vocabulary (the value head never reads a pad position)."""
    eos, pad = chat.eos_id(tokenizer), tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return model, params, int(pad)
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
    pad = int(tokenizer.pad_token_id)
    vocab = model.config.vocab_size
    if pad < vocab:
        return model, params, pad
    embedding = params["embed"]["embedding"]
    rows = jnp.zeros((pad + 1 - vocab, embedding.shape[1]), embedding.dtype)
    params = {**params, "embed": {**params["embed"], "embedding": jnp.concatenate([embedding, rows])}}
    return Transformer(model.config.replace(vocab_size=pad + 1), heads=model.heads), params, pad


def export_hf(workdir: str | pathlib.Path, out: str | pathlib.Path, *, tokenizer: str | None = None) -> dict:
    """Write the newest checkpoint of `workdir` (any stage) to `out` as a Hugging Face directory:
    config.json + model.safetensors (fp32), the tokenizer files, and for a policy generation_config.json.

    Returns the record also written to `out/export.json` (workdir, run id, step, kind, token ids).
    Raises ExportError (one line) for an `out` that holds other files or a run without a tokenizer,
    ValueError for a workdir without an rlhf_jax checkpoint, or a shared-trunk model with both heads.
    """
    from transformers import GenerationConfig

    workdir = pathlib.Path(workdir)
    meta = loading.stage_meta(str(workdir), "--workdir")
    source = run_source(workdir, meta)
    check_out_dir(out, source)
    tok = find_tokenizer(workdir, tokenizer)
    heads = tuple(meta["model"]["heads"])
    extra = {"eos_token_id": chat.eos_id(tok), "bos_token_id": tok.bos_token_id}
    if "value" in heads and "lm" not in heads:
        model, params, norm = loading.load_reward_model(workdir)
        model, params, pad = reward_pad(model, params, tok)
        extra.update(pad_token_id=pad, rlhf_jax_reward_norm={k: float(norm[k]) for k in ("mean", "std")})
        kind = "reward_model"
    else:
        model, params = loading.load_model(workdir, heads=("lm",))
        pad = chat.pad_id(tok)
        extra.update(pad_token_id=pad)
        kind = "policy"
    out = pathlib.Path(out)
    save_pretrained(model, params, out, extra_config=extra)
    tok.save_pretrained(str(out))
    if kind == "policy":
        stop = list(chat.stop_ids(tok))  # every stop id, so `generate` ends where our rollouts end
        GenerationConfig(eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=pad,
                         bos_token_id=extra["bos_token_id"]).save_pretrained(str(out))
    record = {**source, "step": checkpoint_lib.checkpoint_step(workdir),
              "kind": kind, "eos_token_id": extra["eos_token_id"], "pad_token_id": pad,
              "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def export_peft(workdir: str | pathlib.Path, out: str | pathlib.Path) -> dict:
    """Write the LoRA adapters of `workdir`'s newest checkpoint to `out` in the PEFT format
    (`lora.save_peft`: adapter_config.json + adapter_model.safetensors, `base_model_name_or_path` =
    the base the run adapted, as its metadata records it). Returns the record written to
    `out/export.json` (plus "base": the base's source and path). Raises ExportError (one line) for
    a run without adapters, a base that was never saved (scratch), or `out` holding other files;
    ValueError from `save_peft` for adapters PEFT cannot express (modules_to_save, GPT-2)."""
    from rlhf_jax import lora

    workdir = pathlib.Path(workdir)
    meta = loading.stage_meta(str(workdir), "--workdir")
    if "lora" not in meta:
        raise ExportError(f"--workdir {workdir} is not a LoRA run (no adapters in its checkpoint); drop --adapters "
                          "for the full model")
    base = meta["lora"]["base"]
    if base["source"] == "scratch":
        raise ExportError(f"--workdir {workdir}: adapters of a freshly initialised model (init.source='scratch'), "
                          "whose base was never saved: there is nothing for PEFT to load them onto")
    source = run_source(workdir, meta)
    check_out_dir(out, source)
    spec = lora.LoraSpec.from_meta(meta["lora"])
    model = loading.model_from_meta(meta["model"])
    adapters = loading.load_lora_trainable(str(workdir), lora.lora_model(model, spec, train=False), spec,
                                           loading.single_device_mesh())
    lora.save_peft(model, adapters, spec, out, base_model_name_or_path=base["path"])
    record = {**source, "step": checkpoint_lib.checkpoint_step(workdir), "kind": "peft_adapters",
              "base": {"source": base["source"], "path": base["path"]},
              "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (pathlib.Path(out) / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
