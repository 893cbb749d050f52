"""Hugging Face interop: load and save local checkpoint directories (config.json + safetensors).

`from_pretrained(path)` reads a directory written by `transformers` (model_type gpt2, llama, qwen2,
mistral; one `model.safetensors` or a sharded `model.safetensors.index.json`) with the safetensors
API only: no torch, no pickle, no network. `save_pretrained(model, params, path)` writes a directory
that `transformers.AutoModelForCausalLM` loads with the same logits.

Value-head models (reward model, critic: `heads=("value",)`) map to HF's
`*ForSequenceClassification` with one label: its `score.weight [1, d]` is our `value_head/kernel`
transposed, and HF pools the score at the last token that is not `pad_token_id` (we read it at the
last real token of `attention_mask`; the two agree when pad_token_id never occurs inside a text).

The pieces: `hf_config` (config.json <-> `TransformerConfig`), `hf_weights` (tensor names and
layouts <-> our parameter tree); this module reads and writes the files.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.hf_config import (SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf,  # noqa: F401
                                       heads_from_architectures, hf_model_type)
from rlhf_jax.models.hf_weights import hf_tensors_to_params, params_to_hf_tensors  # noqa: F401
from rlhf_jax.models.transformer import Transformer


# ----------------------------------------------------------------------------------------------
# Files: read a checkpoint directory, write one
# ----------------------------------------------------------------------------------------------
def _read_safetensors(file: pathlib.Path) -> dict:
    """All tensors of one file as numpy arrays; bf16 goes through the flax reader (numpy lacks bf16)."""
    out = {}
    with safe_open(str(file), framework="np") as handle:
        names = list(handle.keys())
        bf16 = [n for n in names if handle.get_slice(n).get_dtype() == "BF16"]
        for name in names:
            if name not in bf16:
                out[name] = handle.get_tensor(name)
    if bf16:
        with safe_open(str(file), framework="flax") as handle:
            for name in bf16:
                out[name] = np.asarray(handle.get_tensor(name).astype(np.float32))
    return out


def _checkpoint_files(path: pathlib.Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map' is missing or not a dict")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index}: shard file(s) {missing} listed in weight_map do not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (found {present}); "
                     "only safetensors checkpoints are read (never pickled .bin/.pt files)")


def from_pretrained(path, **overrides) -> tuple:
    """Load a local Hugging Face directory -> `(Transformer, params)`.

    `overrides` replace `TransformerConfig` fields (e.g. `dtype="bfloat16"`, `remat=True`,
    `dropout_rate=0.1`). `*ForCausalLM` / `GPT2LMHeadModel` gives `heads=("lm",)`;
    a 1-label `*ForSequenceClassification` gives `heads=("value",)`.
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: config.json not found (expected a local Hugging Face model directory)")
    hf = json.loads(config_file.read_text())
    config = config_from_hf(hf, str(config_file), **overrides)
    model = Transformer(config, heads=heads_from_architectures(hf, str(config_file)))
    tensors: dict = {}
    for file in _checkpoint_files(path):
        tensors.update(_read_safetensors(file))
    params = hf_tensors_to_params(tensors, model, hf["model_type"], source=str(path))
    return model, jax.tree_util.tree_map(jax.numpy.asarray, params)


def save_pretrained(model: Transformer, params: dict, path, *, extra_config: Optional[dict] = None) -> None:
    """Write `config.json` + `model.safetensors` (fp32) that `transformers` loads.

    `heads=("lm",)` -> `*ForCausalLM` (`AutoModelForCausalLM`); `heads=("value",)` -> 1-label
    `*ForSequenceClassification` (`AutoModelForSequenceClassification`; set `pad_token_id` through
    `extra_config` so it pools at the last real token of right-padded batches). A shared-trunk
    `("lm", "value")` model has no HF equivalent: save its two heads as two models.
    `extra_config` adds fields such as `bos_token_id`, `eos_token_id`, `pad_token_id`.
    """
    if tuple(model.heads) not in (("lm",), ("value",)):
        raise ValueError(f"save_pretrained: heads={model.heads} has no single Hugging Face class "
                         "(supported: ('lm',) -> ForCausalLM, ('value',) -> ForSequenceClassification)")
    hf = config_to_hf(model.config, tuple(model.heads))
    hf.update(extra_config or {})
    tensors = params_to_hf_tensors(model, params)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
