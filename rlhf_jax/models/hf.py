"""Hugging Face interop: load and save local checkpoint directories (config.json + safetensors).

`from_pretrained(path)` reads a directory written by `transformers` (model_type gpt2, llama, qwen2,
mistral; one `model.safetensors` or a sharded `model.safetensors.index.json`) with the safetensors
API only: no torch, no pickle, no network. `save_pretrained(model, params, path)` writes a directory
that `transformers.AutoModelForCausalLM` loads with the same logits.

Value-head models (reward model, critic: `heads=("value",)`) map to HF's
`*ForSequenceClassification` with one label: its `score.weight [1, d]` is our `value_head/kernel`
transposed, and HF pools the score at the last token that is not `pad_token_id` (we read it at the
last real token of `attention_mask`; the two agree when pad_token_id never occurs inside a text).

Name mapping (HF `nn.Linear` stores `[out, in]`, we store `[in, out]`, so those are transposed;
GPT-2's `Conv1D` already stores `[in, out]`; its fused `c_attn` is q|k|v concatenated on `out`):

    ours                          GPT-2 (transformer.*)        Llama / Qwen2 / Mistral (model.*)
    embed/embedding               wte.weight                   embed_tokens.weight
    pos_embed/embedding           wpe.weight                   -
    layers/attn_norm/{scale,bias} h.{i}.ln_1.{weight,bias}     layers.{i}.input_layernorm.weight
    layers/attn/{q,k,v}           h.{i}.attn.c_attn (fused)    layers.{i}.self_attn.{q,k,v}_proj
    layers/attn/o                 h.{i}.attn.c_proj            layers.{i}.self_attn.o_proj
    layers/mlp_norm               h.{i}.ln_2                   layers.{i}.post_attention_layernorm
    layers/mlp/{gate,up,down}     h.{i}.mlp.{-,c_fc,c_proj}    layers.{i}.mlp.{gate,up,down}_proj
    final_norm                    ln_f                         norm
    lm_head/kernel                lm_head.weight (untied)      lm_head.weight (untied)
    value_head/kernel             score.weight                 score.weight
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.transformer import Transformer, TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
_LLAMA_FAMILY = ("llama", "qwen2", "mistral")
_ARCHITECTURE_NAMES = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "Model")
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Non-parameter buffers that some exported checkpoints carry (causal-mask and RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ----------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig
# ----------------------------------------------------------------------------------------------
def _field(hf: dict, key: str, source: str, default: Any = KeyError) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is KeyError:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return default


def _rope_theta(hf: dict, source: str) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta`/`rope_scaling` (older)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: {name}.rope_type={rope_type!r} is not supported "
                             "(supported: plain RoPE, rope_type 'default')")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: dict, model_type: str, source: str) -> Optional[int]:
    """Mistral: `sliding_window` on every layer. Qwen2: only with `use_sliding_window`, per layer."""
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type != "qwen2" or not hf.get("use_sliding_window"):
        return None
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention" for i in range(n_layers)]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return hf["sliding_window"]
    raise ValueError(f"{source}: layer_types mixes full and sliding-window attention ({layer_types}); "
                     "supported: the same attention on every layer")


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> TransformerConfig:
    """Our `TransformerConfig` from a Hugging Face config dict; `overrides` replace any field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_TANH_GELUS:
            raise ValueError(f"{source}: activation_function={act!r} is not supported "
                             f"(supported: {', '.join(_GPT2_TANH_GELUS)})")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (supported: {want})")
        d_model = _field(hf, "n_embd", source)
        fields = dict(vocab_size=_field(hf, "vocab_size", source), d_model=d_model,
                      n_layers=_field(hf, "n_layer", source), n_heads=_field(hf, "n_head", source),
                      d_ff=_field(hf, "n_inner", source, 4 * d_model), max_len=_field(hf, "n_positions", source),
                      norm_eps=float(_field(hf, "layer_norm_epsilon", source, 1e-5)),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        base = TransformerConfig.gpt2
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (supported: 'silu')")
        fields = dict(vocab_size=_field(hf, "vocab_size", source), d_model=_field(hf, "hidden_size", source),
                      n_layers=_field(hf, "num_hidden_layers", source),
                      n_heads=_field(hf, "num_attention_heads", source),
                      n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
                      d_ff=_field(hf, "intermediate_size", source),
                      max_len=_field(hf, "max_position_embeddings", source),
                      norm_eps=float(_field(hf, "rms_norm_eps", source, 1e-6)),
                      rope_theta=_rope_theta(hf, source),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      attn_bias=bool(hf.get("attention_bias", False)), qkv_bias=model_type == "qwen2",
                      mlp_bias=bool(hf.get("mlp_bias", False)),
                      sliding_window=_sliding_window(hf, model_type, source))
        base = TransformerConfig.llama
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(f"from_pretrained: unknown override(s) {sorted(unknown)}; "
                         f"allowed: TransformerConfig fields {[f.name for f in dataclasses.fields(TransformerConfig)]}")
    return base(**{**fields, **overrides})


def hf_model_type(config: TransformerConfig) -> str:
    """The Hugging Face model_type that implements `config` exactly, or a ValueError saying why none does."""
    if (config.positions, config.norm, config.mlp) == ("learned", "layernorm", "gelu"):
        if (config.attn_bias, config.mlp_bias, config.qkv_bias) != (True, True, False) or config.sliding_window:
            raise ValueError("save_pretrained: a GPT-2 style config needs attn_bias=True, mlp_bias=True, "
                             "qkv_bias=False, sliding_window=None")
        if config.n_kv_heads not in (None, config.n_heads) or config.head_dim not in (None, config.d_model // config.n_heads):
            raise ValueError("save_pretrained: GPT-2 has no grouped-query attention or custom head_dim")
        return "gpt2"
    if (config.positions, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu"):
        if config.qkv_bias and not config.attn_bias and not config.mlp_bias:
            return "qwen2"
        if config.sliding_window is not None:
            if config.attn_bias or config.qkv_bias or config.mlp_bias:
                raise ValueError("save_pretrained: sliding_window with biases matches no supported HF model "
                                 "(mistral has no biases; qwen2 has qkv biases only)")
            return "mistral"
        if config.qkv_bias and not config.attn_bias:
            raise ValueError("save_pretrained: qkv_bias with mlp_bias matches no supported HF model")
        return "llama"
    raise ValueError(f"save_pretrained: positions={config.positions!r}, norm={config.norm!r}, mlp={config.mlp!r} "
                     "matches no supported HF model (gpt2: learned/layernorm/gelu; "
                     "llama, qwen2, mistral: rope/rmsnorm/swiglu)")


def config_to_hf(config: TransformerConfig, heads: tuple) -> dict:
    """Hugging Face config dict for `config`; `heads=("value",)` gives a 1-label sequence classifier."""
    model_type = hf_model_type(config)
    suffix = "ForSequenceClassification" if heads == ("value",) else (
        "LMHeadModel" if model_type == "gpt2" else "ForCausalLM")
    hf: dict = {"model_type": model_type, "architectures": [_ARCHITECTURE_NAMES[model_type] + suffix],
                "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
                "dtype": "float32", "use_cache": True}
    if model_type == "gpt2":
        hf.update(n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_ff,
                  n_positions=config.max_len, layer_norm_epsilon=config.norm_eps, activation_function="gelu_new",
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        hf.update(hidden_size=config.d_model, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
                  head_dim=config.dim_per_head, intermediate_size=config.d_ff,
                  max_position_embeddings=config.max_len, rms_norm_eps=config.norm_eps, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attention_dropout=0.0)
        if model_type == "llama":
            hf.update(attention_bias=config.attn_bias, mlp_bias=config.mlp_bias)
        if model_type == "mistral":
            hf.update(sliding_window=config.sliding_window)
        if model_type == "qwen2":
            sliding = config.sliding_window is not None
            hf.update(use_sliding_window=sliding, sliding_window=config.sliding_window, max_window_layers=0,
                      layer_types=[("sliding_attention" if sliding else "full_attention")] * config.n_layers)
    if heads == ("value",):
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


# ----------------------------------------------------------------------------------------------
# Tensor name mapping
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Rule:
    """HF tensor `hf_name` <-> our params at `paths` (several = concatenated on HF's last axis).

    `per_layer`: `hf_name` has an `{i}` and our arrays are stacked over layers on axis 0.
    `transpose`: HF stores `[out, in]` (nn.Linear) while we store `[in, out]`.
    """

    paths: tuple
    hf_name: str
    per_layer: bool = False
    transpose: bool = False


def _rules(config: TransformerConfig, heads: tuple, model_type: str, prefix: str) -> list:
    """All name rules for this architecture (one source of truth for loading and saving)."""
    rules = []
    if model_type == "gpt2":
        layer = prefix + "h.{i}."
        rules += [_Rule((("embed", "embedding"),), prefix + "wte.weight"),
                  _Rule((("pos_embed", "embedding"),), prefix + "wpe.weight"),
                  _Rule((("final_norm", "scale"),), prefix + "ln_f.weight"),
                  _Rule((("final_norm", "bias"),), prefix + "ln_f.bias")]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [_Rule((("layers", ours, "scale"),), layer + theirs + ".weight", per_layer=True),
                      _Rule((("layers", ours, "bias"),), layer + theirs + ".bias", per_layer=True)]
        for kind in ("kernel", "bias"):
            hf_kind = "weight" if kind == "kernel" else "bias"
            rules += [
                _Rule(tuple(("layers", "attn", p, kind) for p in "qkv"), layer + "attn.c_attn." + hf_kind, True),
                _Rule((("layers", "attn", "o", kind),), layer + "attn.c_proj." + hf_kind, True),
                _Rule((("layers", "mlp", "up", kind),), layer + "mlp.c_fc." + hf_kind, True),
                _Rule((("layers", "mlp", "down", kind),), layer + "mlp.c_proj." + hf_kind, True)]
    else:
        layer = prefix + "layers.{i}."
        rules += [_Rule((("embed", "embedding"),), prefix + "embed_tokens.weight"),
                  _Rule((("final_norm", "scale"),), prefix + "norm.weight"),
                  _Rule((("layers", "attn_norm", "scale"),), layer + "input_layernorm.weight", True),
                  _Rule((("layers", "mlp_norm", "scale"),), layer + "post_attention_layernorm.weight", True)]
        for ours in "qkvo":
            rules.append(_Rule((("layers", "attn", ours, "kernel"),), layer + f"self_attn.{ours}_proj.weight",
                               True, transpose=True))
            if config.attn_bias or (config.qkv_bias and ours != "o"):
                rules.append(_Rule((("layers", "attn", ours, "bias"),), layer + f"self_attn.{ours}_proj.bias", True))
        for ours in ("gate", "up", "down"):
            rules.append(_Rule((("layers", "mlp", ours, "kernel"),), layer + f"mlp.{ours}_proj.weight", True,
                               transpose=True))
            if config.mlp_bias:
                rules.append(_Rule((("layers", "mlp", ours, "bias"),), layer + f"mlp.{ours}_proj.bias", True))
    if "lm" in heads and not config.tie_embeddings:
        rules.append(_Rule((("lm_head", "kernel"),), "lm_head.weight", transpose=True))
    if "value" in heads:
        rules.append(_Rule((("value_head", "kernel"),), "score.weight", transpose=True))
    return rules


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _param_shapes(model: Transformer) -> dict:
    """Shapes of the parameter tree `model` expects (nothing is allocated)."""
    from rlhf_jax.models.transformer import init_params
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract)


def _path_str(path: tuple) -> str:
    return "/".join(path)


def hf_tensors_to_params(tensors: dict, model: Transformer, model_type: str, source: str = "checkpoint") -> dict:
    """Our fp32 parameter tree from HF tensors (name -> array); ValueError on any missing/extra/mis-shaped one."""
    config = model.config
    default_prefix = "transformer." if model_type == "gpt2" else "model."
    has_prefix = any(name.startswith(default_prefix) for name in tensors)
    prefix = default_prefix if has_prefix or model_type != "gpt2" else ""  # original GPT-2 files: no prefix
    shapes = _param_shapes(model)
    params: dict = {}
    used = set()

    def read(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name!r} (needed for model_type={model_type!r}, "
                             f"heads={model.heads}, tie_embeddings={config.tie_embeddings})")
        used.add(name)
        return np.asarray(tensors[name], np.float32)

    for rule in _rules(config, model.heads, model_type, prefix):
        want = [_get(shapes, p) for p in rule.paths]
        layer_ids = range(config.n_layers) if rule.per_layer else [None]
        pieces: list = [[] for _ in rule.paths]
        for i in layer_ids:
            name = rule.hf_name.format(i=i)
            array = read(name)
            array = array.T if rule.transpose else array
            per_piece = [w[1:] if rule.per_layer else w for w in want]
            expected = per_piece[0][:-1] + (sum(w[-1] for w in per_piece),)
            if array.shape != expected:
                stored = array.T.shape if rule.transpose else array.shape
                wanted = expected[::-1] if rule.transpose else expected
                raise ValueError(f"{source}: tensor {name!r} has shape {stored}, config.json implies {wanted} "
                                 f"(our {', '.join(_path_str(p) for p in rule.paths)})")
            splits = np.cumsum([w[-1] for w in per_piece])[:-1]
            for j, part in enumerate(np.split(array, splits, axis=-1)):
                pieces[j].append(part)
        for path, parts in zip(rule.paths, pieces):
            _set(params, path, np.stack(parts) if rule.per_layer else parts[0])

    ignorable = {name for name in tensors if name.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings:
        ignorable.add("lm_head.weight")  # some exports store the tied copy as well
    extra = sorted(set(tensors) - used - ignorable)
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} for "
                         f"model_type={model_type!r}, heads={model.heads} (is the config.json consistent?)")
    return params


def params_to_hf_tensors(model: Transformer, params: dict) -> dict:
    """HF tensor dict (name -> contiguous fp32 numpy array) for our parameter tree."""
    config = model.config
    model_type = hf_model_type(config)
    prefix = "transformer." if model_type == "gpt2" else "model."
    tensors = {}
    for rule in _rules(config, model.heads, model_type, prefix):
        arrays = [np.asarray(_get(params, p), np.float32) for p in rule.paths]
        joined = np.concatenate(arrays, axis=-1)
        for i in range(config.n_layers) if rule.per_layer else [None]:
            array = joined[i] if rule.per_layer else joined
            tensors[rule.hf_name.format(i=i)] = np.ascontiguousarray(array.T if rule.transpose else array)
    return tensors


# ----------------------------------------------------------------------------------------------
# Files
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


def _heads_from_architectures(hf: dict, source: str) -> tuple:
    architectures = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        n_labels = len(hf.get("id2label") or {"0": None})
        if n_labels != 1:
            raise ValueError(f"{source}: a sequence classifier with {n_labels} labels is not supported "
                             "(supported: 1 label, a reward model / critic)")
        return ("value",)
    return ("lm",)


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
    model = Transformer(config, heads=_heads_from_architectures(hf, str(config_file)))
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
