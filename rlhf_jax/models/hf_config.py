"""Hugging Face `config.json` <-> our `TransformerConfig` (model_type gpt2, llama, qwen2, mistral).

`config_from_hf` reads a config dict (every unsupported setting is a ValueError naming the
field), `config_to_hf` writes one that `transformers` builds the same model from, and
`heads_from_architectures` maps the `architectures` entry to our heads: `*ForCausalLM` /
`GPT2LMHeadModel` -> `("lm",)`, a 1-label `*ForSequenceClassification` -> `("value",)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rlhf_jax.models.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
_ARCHITECTURE_NAMES = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


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



def heads_from_architectures(hf: dict, source: str) -> tuple:
    architectures = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        n_labels = len(hf.get("id2label") or {"0": None})
        if n_labels != 1:
            raise ValueError(f"{source}: a sequence classifier with {n_labels} labels is not supported "
                             "(supported: 1 label, a reward model / critic)")
        return ("value",)
    return ("lm",)
