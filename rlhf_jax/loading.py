"""Where models, weights and tokenizers come from: one module for trainers and research code.

    import rlhf_jax
    model, params, tokenizer = rlhf_jax.load_run("runs/sft")    # any stage's run: model, params, its tokenizer
    model, params = rlhf_jax.load("runs/sft")                   # a stage's newest checkpoint, 1 device
    model, params, norm = rlhf_jax.load_reward_model("runs/rm")  # + its score normalisation
    tokenizer = rlhf_jax.load_tokenizer("runs/sft/tokenizer")

Every stage says where a model starts with an `init` section (configs/common.init_config):
`source` = "scratch" (a fresh `config.model`), "checkpoint" (an earlier stage's run dir, its
checkpoints/ dir or one step dir) or "hf" (a local Hugging Face directory: config.json +
*.safetensors). `architecture(init, model_cfg, heads)` builds the module, `initial_params(...)`
the weights; both take that section, never a whole stage config. `key` arguments are the dotted
config key the user wrote (e.g. "config.actor.init"), so every error names it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Mapping

import jax

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import sharding
from rlhf_jax.models import Transformer, TransformerConfig, from_pretrained, init_params, lm_params_to_scalar
from rlhf_jax.models.hf_config import config_from_hf

SOURCES = ("scratch", "checkpoint", "hf")
IDENTITY_NORM = {"mean": 0.0, "std": 1.0}
RUNTIME_FIELDS = ("dtype", "remat", "dropout_rate")  # what a stage may change on a loaded architecture


# ----------------------------------------------------------------------------------------------
# Init sections
# ----------------------------------------------------------------------------------------------
def is_hf_dir(path: str | pathlib.Path) -> bool:
    directory = pathlib.Path(path)
    return (directory / "config.json").is_file() and (any(directory.glob("*.safetensors"))
                                                      or (directory / "model.safetensors.index.json").exists())


def check_init(init, key: str = "config.init", allowed: tuple[str, ...] = SOURCES) -> None:
    """One-line ValueError naming `key` unless `init.source` is in `allowed` and a non-scratch
    source has an existing `init.path` of the right kind (an HF dir for "hf")."""
    if init.source not in allowed:
        raise ValueError(f"{key}.source={init.source!r} (allowed: {', '.join(map(repr, allowed))})")
    if init.source not in ("checkpoint", "hf"):
        return
    if not init.path:
        raise ValueError(f"{key}.path is empty but {key}.source={init.source!r}: give the path of the starting "
                         f"point (--{key}.path=...)")
    if not pathlib.Path(init.path).exists():
        raise ValueError(f"{key}.path={init.path!r} does not exist")
    if init.source == "hf" and not is_hf_dir(init.path):
        raise ValueError(f"{key}.path={init.path!r} is not a Hugging Face model directory: {key}.source='hf' "
                         "needs config.json + *.safetensors (pickled weights are never read)")


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------
def transformer_config(model_cfg, vocab_size: int | None = None) -> TransformerConfig:
    """`TransformerConfig` from a config.model section (configs/common.model_config fields).

    vocab_size 0 in the config means `vocab_size` (the tokenizer's); n_kv_heads 0 means n_heads.
    """
    fields = {k: v for k, v in model_cfg.items() if k != "family"}
    if not fields.get("vocab_size"):
        if not vocab_size:
            raise ValueError("config.model.vocab_size is 0 (= the tokenizer's) but no tokenizer size is known")
        fields["vocab_size"] = vocab_size
    fields["n_kv_heads"] = fields.get("n_kv_heads") or None
    families = {"llama": TransformerConfig.llama, "gpt2": TransformerConfig.gpt2}
    family = model_cfg.get("family", "llama")
    if family not in families:
        raise ValueError(f"config.model.family={family!r} (allowed: 'llama', 'gpt2')")
    unknown = set(fields) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(f"config.model has fields {sorted(unknown)} that TransformerConfig does not know")
    return families[family](**fields)


def model_meta(model: Transformer) -> dict:
    """JSON description of a model saved with each checkpoint (how later stages rebuild it)."""
    return {"config": dataclasses.asdict(model.config), "heads": list(model.heads)}


def model_from_meta(meta_model: Mapping[str, Any], **overrides) -> Transformer:
    return Transformer(TransformerConfig(**{**meta_model["config"], **overrides}), heads=tuple(meta_model["heads"]))


def stage_meta(path: str, key: str) -> dict:
    """Checkpoint metadata of an rlhf_jax run; one-line error naming `key` when it has none."""
    meta = checkpoint_lib.read_meta(path)
    if "model" not in meta:
        raise ValueError(f"{key}={path!r}: checkpoint metadata has no 'model' entry (not written by an rlhf_jax "
                         "trainer?)")
    return meta


def architecture(init, model_cfg, heads: tuple, vocab_size: int | None = None,
                 key: str = "config.init") -> Transformer:
    """The model (no weights) with `heads`: from `model_cfg` when `init.source` is "scratch", else
    from the checkpoint metadata or the HF config.json at `init.path`; the runtime fields (dtype,
    remat, dropout_rate) always come from `model_cfg`."""
    if init.source == "scratch":
        return Transformer(transformer_config(model_cfg, vocab_size), heads=heads)
    runtime = {k: model_cfg[k] for k in RUNTIME_FIELDS if k in model_cfg}
    if init.source == "checkpoint":
        return Transformer(model_from_meta(stage_meta(init.path, f"{key}.path")["model"], **runtime).config,
                           heads=heads)
    if init.source == "hf":
        config_file = pathlib.Path(init.path) / "config.json"
        return Transformer(config_from_hf(json.loads(config_file.read_text()), str(config_file), **runtime),
                           heads=heads)
    raise ValueError(f"{key}.source={init.source!r} (allowed: {', '.join(map(repr, SOURCES))})")


def param_shapes(model: Transformer) -> Any:
    """Parameter ShapeDtypeStructs of `model` (nothing materialised)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def load_checkpoint_params(path: str, model: Transformer, param_sh: Any) -> Any:
    """The "params" item of an rlhf_jax checkpoint at `path`, restored onto `param_sh`. A LoRA
    checkpoint (metadata "lora") holds adapters and heads only: they are merged into the base its
    metadata points at (`rlhf_jax.lora.merge`; a QLoRA base dequantised), giving plain weights of `model`."""
    lora_meta = checkpoint_lib.read_meta(path).get("lora")
    if lora_meta is None:
        return checkpoint_lib.load_params(path, checkpoint_lib.abstract_tree(param_shapes(model), param_sh))
    from types import SimpleNamespace

    from rlhf_jax import lora

    spec = lora.LoraSpec.from_meta(lora_meta)
    base_init = SimpleNamespace(**lora_meta["base"])
    if base_init.source == "scratch":
        raise ValueError(f"{path}: LoRA adapters of a freshly initialised (init.source='scratch') model; that base "
                         "was never saved, so the adapters cannot be merged (start LoRA runs from a checkpoint or hf)")
    base = initial_params(base_init, model, param_sh, jax.random.PRNGKey(0), key=f"{path} (lora base)")
    lmodel = lora.lora_model(model, spec, train=False)
    trainable = load_lora_trainable(path, lmodel, spec, jax.tree.leaves(param_sh)[0].mesh)
    if spec.quantized:  # QLoRA: the adapters were trained on the quantised base; merge into its dequantised form
        base = jax.jit(lambda b: lora.quantize_base(lmodel, b))(base)
    return sharding.shard_params(lora.merge(lora.combine(trainable, base), spec), param_sh)


def load_lora_trainable(path: str, lmodel: Transformer, spec, mesh) -> Any:
    """The "params" item of a LoRA checkpoint as it is stored: the adapters (fp32 `*_lora_a` /
    `*_lora_b`) and `spec.modules_to_save`, for the LoRA model `lmodel` (`lora.lora_model`)."""
    from rlhf_jax import lora

    shapes, shardings = lora.split(param_shapes(lmodel), spec)[0], lora.split(
        sharding.param_shardings(lmodel, mesh), spec)[0]
    return checkpoint_lib.load_params(path, checkpoint_lib.abstract_tree(shapes, shardings))


def fit_heads(params: Mapping[str, Any], model: Transformer, rng: jax.Array, key: str) -> dict:
    """Source weights adapted to `model.heads`: a missing value head is added fresh (reward model
    or critic from an LM: unembedding dropped, `heads.lm_params_to_scalar`); an unused lm_head or
    value_head is dropped; a needed LM head that the source lacks is an error naming `key`."""
    params = dict(params)
    if "value" in model.heads and "value_head" not in params:
        params = lm_params_to_scalar(params, rng, model.config.d_model)
    if "value" not in model.heads:
        params.pop("value_head", None)
    if "lm" not in model.heads:
        params.pop("lm_head", None)
    if "lm" in model.heads and not model.config.tie_embeddings and "lm_head" not in params:
        raise ValueError(f"{key}.path holds no LM head (a reward model?); this role needs a language model")
    return params


def initial_params(init, model: Transformer, param_sh: Any, rng: jax.Array, options: dict | None = None,
                   key: str = "config.init") -> Any:
    """Starting parameters of `model`, placed on `param_sh`: a fresh init (jitted straight onto
    the shardings) for "scratch", else the weights at `init.path` fitted to `model.heads`."""
    if init.source == "scratch":
        return jax.jit(lambda r: init_params(model, r), out_shardings=param_sh, compiler_options=options)(rng)
    if init.source == "checkpoint":
        saved = model_from_meta(stage_meta(init.path, f"{key}.path")["model"])
        params = load_checkpoint_params(init.path, saved, sharding.param_shardings(saved, jax.tree.leaves(
            param_sh)[0].mesh))
    else:
        _, params = from_pretrained(init.path)
    params = fit_heads(params, model, rng, key)
    expected = jax.tree.structure(param_shapes(model))
    if jax.tree.structure(params) != expected:
        raise ValueError(f"{key}.path={init.path!r}: parameter tree does not match the model "
                         f"({jax.tree.structure(params)} vs {expected})")
    return sharding.shard_params(params, param_sh)


def single_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def load_model(path: str | pathlib.Path, *, heads: tuple[str, ...] | None = None, mesh=None,
               rules=sharding.DEFAULT_RULES) -> tuple[Transformer, Any]:
    """(model, params) of a stage's newest checkpoint (run dir, checkpoints/ dir or step dir).

    The model is rebuilt from the checkpoint metadata with dropout off (for inference); `heads`
    keeps only those heads' parameters (ValueError when the checkpoint lacks one). Parameters are
    placed on `mesh` by their logical axes (default: one device).
    """
    saved = model_from_meta(stage_meta(str(path), "path")["model"])
    mesh = mesh if mesh is not None else single_device_mesh()
    params = load_checkpoint_params(str(path), saved, sharding.param_shardings(saved, mesh, rules))
    heads = tuple(saved.heads) if heads is None else tuple(heads)
    missing = [h for h in heads if h not in saved.heads]
    if missing:
        raise ValueError(f"{path}: the saved model has heads {tuple(saved.heads)}, not {tuple(missing)}")
    params = {name: value for name, value in params.items()
              if not (name == "lm_head" and "lm" not in heads) and not (name == "value_head" and "value" not in heads)}
    return Transformer(saved.config.replace(dropout_rate=0.0), heads=heads), params


def reward_norm(path: str) -> dict:
    """The normalisation stored with an RM checkpoint: {"mean", "std", ...} (score = (raw - mean) /
    std; rm.reward_norm also records "num_responses"); identity for an HF directory or a
    checkpoint without one."""
    if is_hf_dir(path):
        return dict(IDENTITY_NORM)
    return dict(checkpoint_lib.read_meta(path).get("reward_norm", IDENTITY_NORM))


def load_reward_model(path: str | pathlib.Path, *, mesh=None, rules=sharding.DEFAULT_RULES):
    """(model, params, norm) of a reward-model checkpoint; ValueError when it is not one."""
    meta = stage_meta(str(path), "path")
    if "value" not in meta["model"]["heads"]:
        raise ValueError(f"{path}: not a reward-model checkpoint (its model heads are {tuple(meta['model']['heads'])})")
    model, params = load_model(path, heads=("value",), mesh=mesh, rules=rules)
    return model, params, dict(meta.get("reward_norm", IDENTITY_NORM))  # reward_norm(path), from the meta read


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
def load_tokenizer(path: str):
    """A local Hugging Face tokenizer directory, or a run dir holding one in `tokenizer/` (no
    network, no remote code).

    Only JSON / text vocabulary files are read; a tokenizer_config.json that asks for custom Python
    code (`auto_map`) is refused up front with a one-line error instead of being imported.
    """
    from transformers import AutoTokenizer

    directory = pathlib.Path(path)
    has_files = lambda d: (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists()  # noqa: E731
    if not has_files(directory) and has_files(directory / "tokenizer"):  # a run dir: its copy of the tokenizer
        directory = directory / "tokenizer"
    if not has_files(directory):
        raise ValueError(f"tokenizer path {str(path)!r} has no tokenizer.json / tokenizer_config.json (nor a "
                         "tokenizer/ sub-directory with them, as a run dir has)")
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        try:
            tokenizer_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from None
        if "auto_map" in tokenizer_config:
            raise ValueError(f"{config_file}: 'auto_map' asks for custom tokenizer code; remote/custom code is "
                             "never run (use a tokenizer.json-based tokenizer)")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def run_tokenizer_dir(path: str | pathlib.Path) -> str | None:
    """The tokenizer directory of a run: `path`/tokenizer for a run dir, else the one recorded in its
    checkpoint metadata (SFT, RM and RL runs record theirs); None when neither exists."""
    own = pathlib.Path(path) / "tokenizer"
    if own.is_dir():
        return str(own)
    recorded = checkpoint_lib.read_meta(str(path)).get("tokenizer")
    return recorded if recorded and pathlib.Path(recorded).is_dir() else None


def load_run(path: str | pathlib.Path, *, mesh=None, rules=sharding.DEFAULT_RULES):
    """(model, params, tokenizer) of any stage's run dir, its checkpoints/ dir or one step dir: the
    newest checkpoint's model (dropout off, its own heads: ("lm",) for a policy, ("value",) for a
    reward model) and parameters on `mesh` (default: one device), and the run's tokenizer.

    ValueError when `path` holds no rlhf_jax checkpoint or the run has no tokenizer (a run on
    synthetic data: load the model with `load` and a tokenizer with `load_tokenizer`)."""
    model, params = load_model(path, mesh=mesh, rules=rules)
    directory = run_tokenizer_dir(path)
    if directory is None:
        raise ValueError(f"{path}: no tokenizer/ in the run dir and none recorded with its checkpoint (a run on "
                         "synthetic data?); load one with rlhf_jax.load_tokenizer(DIR)")
    return model, params, load_tokenizer(directory)


def tokenizer_path(tokenizer: str, init, task_files: Mapping[str, str] | None = None,
                   key: str = "config.init") -> str:
    """Tokenizer dir: `tokenizer` (config.data.tokenizer) when set, else the HF init dir, else the
    one recorded in the init checkpoint's metadata, else the built-in task's; an error otherwise."""
    if tokenizer:
        return tokenizer
    if init.source == "hf":
        return init.path
    if init.source == "checkpoint":
        recorded = checkpoint_lib.read_meta(init.path).get("tokenizer")
        if recorded and pathlib.Path(recorded).exists():
            return recorded
    if task_files:
        return task_files["tokenizer"]
    raise ValueError(f"config.data.tokenizer is empty and no tokenizer comes with {key} "
                     "(give a local Hugging Face tokenizer directory)")


def save_tokenizer(tokenizer, workdir: str) -> None:
    """Copy the run's tokenizer to WORKDIR/tokenizer (later stages find it through the checkpoint),
    with the `generation_config.json` beside its source, which lists the stop ids (`chat.stop_ids`)."""
    if jax.process_index() == 0:
        out = pathlib.Path(workdir) / "tokenizer"
        tokenizer.save_pretrained(str(out))
        source = pathlib.Path(str(tokenizer.name_or_path or "")) / "generation_config.json"
        if source.is_file() and source.resolve() != (out / source.name).resolve():
            shutil.copyfile(source, out / source.name)


def check_vocab(model: Transformer, tokenizer, init, key: str = "config.init", tokenizer_setting: str = "",
                tokenizer_key: str = "config.data.tokenizer") -> None:
    """One-line ValueError (a config error: it starts with the key) when the tokenizer has ids the
    model cannot embed (len(tokenizer) > vocab_size), with both sizes. It names `tokenizer_key` when
    the config set the tokenizer (`tokenizer_setting`, its value), and where the model's vocabulary
    comes from: `key`.path for a checkpoint or HF model, config.model.vocab_size for a fresh one."""
    size, vocab = len(tokenizer), model.config.vocab_size
    if size <= vocab:
        return
    if init.source in ("checkpoint", "hf"):
        model_side = f"{key}.path={init.path!r} holds a model with vocab_size={vocab}"
        recorded = f" (leave {tokenizer_key} empty for the one recorded with it)" if (
            tokenizer_setting and init.source == "checkpoint") else ""
        fix = f"use the tokenizer that model was trained with{recorded} or a model whose vocabulary holds {size} tokens"
    else:
        model_side = f"config.model.vocab_size={vocab}"
        fix = f"set config.model.vocab_size to 0 (= the tokenizer's size) or at least {size}"
    tokens = f"{size} tokens (ids up to {size - 1})"
    if tokenizer_setting:
        raise ValueError(f"{tokenizer_key}={tokenizer_setting!r}: the tokenizer has {tokens} but {model_side}; {fix}")
    raise ValueError(f"{model_side} but the tokenizer {str(tokenizer.name_or_path)!r} has {tokens}; {fix}")
