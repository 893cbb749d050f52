"""Hugging Face tensors <-> our parameter tree (names, transposes, fused q|k|v, layer stacking).

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

import jax
import numpy as np

from rlhf_jax.models.hf_config import hf_model_type
from rlhf_jax.models.transformer import Transformer, TransformerConfig, init_params

# Non-parameter buffers that some exported checkpoints carry (causal-mask and RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


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
