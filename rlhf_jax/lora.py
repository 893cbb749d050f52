"""LoRA (Hu et al. 2021) on the Transformer's projections, through Google's `qwix`.

A frozen kernel `W [in, out]` gets a trainable low-rank update: `y = x·W + (alpha / r)·(x·A)·B`
with `A [in, r]` (He-uniform init) and `B [r, out]` (zero init), so a fresh adapter leaves the
model unchanged. `qwix.LoraProvider` intercepts the projection's `dot_general` and creates the
parameters `kernel_lora_a` / `kernel_lora_b` next to `kernel` (under `nn.scan` they get the
leading `layers` axis and the kernel's logical axis names: A `(layers, <in axis>, None)`,
B `(layers, None, <out axis>)`, so `rlhf_jax.sharding`'s rules cover them).

Why the provider below also intercepts `rlhf_jax.models.matmul.matmul`: on XLA:CPU that matmul
carries a hand-written VJP (`jax.custom_vjp`). Left alone, qwix adds the LoRA term inside the
custom-VJP function, whose backward rule knows nothing of A and B: taking a gradient raises
`UnexpectedTracerError` (tests/test_lora.py::test_qwix_inside_custom_vjp_fails shows it). The
provider therefore sends each projection of a LoRA model straight to qwix's `dot_general`
(JAX's own VJP). The custom VJP only saved the frozen kernel's weight-gradient transpose
(docs/benchmarks.md), which a LoRA step does not compute.

The pieces every trainer uses (SFT, RM, the RL actor; a DPO trainer can call the same):
`LoraSpec.from_config` (config.lora), `lora_model` (the adapted model), `init_adapters`,
`split` / `combine` (trainable adapters + heads vs the frozen base), `merge` (W + (alpha/r)·A·B,
for export: `save_merged`). The adapter-free forward is the plain model applied to the base
tree (`split(params)[1]`): that is the reference model of RL and DPO, with no second copy.
"""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from rlhf_jax.models import Transformer

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Attention (q, k, v, o) and MLP (gate, up, down) projections; "layers/" is the scanned training
# layout, the bare form the per-layer decode layout (rlhf_jax.models.decode).
DEFAULT_TARGETS = r"(layers/)?(attn/(q|k|v|o)|mlp/(gate|up|down))"
SAVABLE_MODULES = ("embed", "pos_embed", "final_norm", "lm_head", "value_head")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r > 0; alpha (the update is scaled by alpha / r); dropout on the adapter's input
    (training only); target_modules: regex that must match a projection's whole module path
    (e.g. "layers/attn/q"); modules_to_save: top-level parameter groups trained in full alongside
    the adapters (PEFT's term): the trainers add "value_head" for a reward model or a shared critic;
    `config.lora.modules_to_save` may add "embed", "pos_embed", "final_norm", "lm_head"."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS
    modules_to_save: tuple = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg, key: str = "config.lora", modules_to_save: tuple = ()) -> "LoraSpec | None":
        """`None` when `cfg.rank == 0` (LoRA off); ValueError naming the key for a bad value."""
        if cfg.rank == 0:
            return None
        if cfg.rank < 0:
            raise ValueError(f"{key}.rank={cfg.rank} must be >= 0 (0 = LoRA off)")
        if cfg.alpha <= 0:
            raise ValueError(f"{key}.alpha={cfg.alpha} must be > 0")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"{key}.dropout={cfg.dropout} must be in [0, 1)")
        try:
            re.compile(cfg.target_modules)
        except re.error as e:
            raise ValueError(f"{key}.target_modules={cfg.target_modules!r} is not a regex: {e}") from None
        extra = tuple(name.strip() for name in cfg.modules_to_save.split(",") if name.strip())
        unknown = sorted(set(extra) - set(SAVABLE_MODULES))
        if unknown:
            raise ValueError(f"{key}.modules_to_save={cfg.modules_to_save!r}: unknown {unknown} (allowed: "
                             f"{', '.join(SAVABLE_MODULES)})")
        return cls(int(cfg.rank), float(cfg.alpha), float(cfg.dropout), cfg.target_modules,
                   tuple(dict.fromkeys(tuple(modules_to_save) + extra)))

    def meta(self) -> dict:
        """JSON-able description (checkpoint metadata)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules, "modules_to_save": list(self.modules_to_save)}


class _Provider(qwix.LoraProvider):
    """`qwix.LoraProvider` that also takes over `rlhf_jax.models.matmul.matmul` (see module doc)."""

    def get_intercept_map(self):
        return super().get_intercept_map() | {"rlhf_jax.models.matmul.matmul": self._matmul}

    def _matmul(self, x, w, out_dtype=None):
        """As `matmul`: the result in `out_dtype`, else x's dtype (the fp32 adapters would otherwise
        promote a bf16 model's activations to fp32 and break `nn.scan`'s carry)."""
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return self.dot_general(x, w, dims, preferred_element_type=out_dtype).astype(out_dtype or x.dtype)


def lora_model(model: Transformer, spec: LoraSpec, *, train: bool = True) -> Transformer:
    """`model` with LoRA on the projections whose path matches `spec.target_modules`; its params are
    the base tree plus `*_lora_a [.., in, r]` / `*_lora_b [.., r, out]` fp32 leaves. `train=False`
    drops the adapter dropout (evaluation, generation). Raises ValueError if nothing matches."""
    rule = qwix.LoraRule(module_path=spec.target_modules, rank=spec.rank, alpha=spec.alpha,
                         dropout=spec.dropout if train else 0.0)
    return qwix.apply_lora_to_model(model, _Provider([rule]))


def _name(path) -> str:
    return getattr(path[-1], "key", str(path[-1]))


def is_adapter(path) -> bool:
    return _name(path).endswith(ADAPTER_SUFFIXES)


def _trainable(path, spec: LoraSpec) -> bool:
    return is_adapter(path) or getattr(path[0], "key", None) in spec.modules_to_save


def split(params: dict, spec: LoraSpec) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts: adapters and `spec.modules_to_save` vs the base weights."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    trainable, frozen = {}, {}
    for path, leaf in flat:
        node = trainable if _trainable(path, spec) else frozen
        for p in path[:-1]:
            node = node.setdefault(p.key, {})
        node[path[-1].key] = leaf
    return trainable, frozen


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split`: one nested dict (no copies of the arrays)."""
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = combine(value, out.get(key, {})) if isinstance(value, dict) else value
    return out


def init_adapters(model: Transformer, base: dict, rng: jax.Array, seq_len: int = 8) -> dict:
    """Fresh adapters for the LoRA `model` (from `lora_model`) on top of `base` params: A He-uniform,
    B zeros (fp32), as qwix initialises them. Raises ValueError when no projection matched."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    _, variables = model.apply({"params": base}, ids, rngs={"params": rng}, mutable=["params"])
    params = nn.meta.unbox(variables["params"])
    adapters = jax.tree_util.tree_map_with_path(lambda p, x: x if is_adapter(p) else None, params)
    adapters = _prune(adapters)
    if not adapters:
        raise ValueError("config.lora.target_modules matched no projection of the model "
                         "(module paths look like 'layers/attn/q', 'layers/mlp/down')")
    return adapters


def _prune(tree):
    if isinstance(tree, dict):
        pruned = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in pruned.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def merge(params: dict, spec: LoraSpec) -> dict:
    """Base-only params with every adapted kernel replaced by `W + (alpha / r)·A·B` (fp32):
    the plain model on them computes what the LoRA model computes on `params` (up to rounding)."""
    def walk(node):
        out = {}
        for key, value in node.items():
            if key.endswith(ADAPTER_SUFFIXES):
                continue
            if isinstance(value, dict):
                out[key] = walk(value)
            elif key + "_lora_a" in node:
                a, b = node[key + "_lora_a"], node[key + "_lora_b"]
                delta = jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)
                out[key] = (value + spec.scale * delta).astype(value.dtype)
            else:
                out[key] = value
        return out
    return walk(params)


def count(tree) -> int:
    """Number of parameters (elements) in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def save_merged(model: Transformer, params: dict, spec: LoraSpec, path, **kwargs) -> None:
    """`rlhf_jax.models.save_pretrained` of the merged weights: a plain Hugging Face model
    (transformers and vLLM load it without peft). `model` is the base (unwrapped) model."""
    from rlhf_jax.models import save_pretrained

    save_pretrained(model, merge(params, spec), path, **kwargs)


# Our projection -> the Hugging Face Llama-family module (transformers' LlamaForCausalLM & co.).
_HF_MODULES = {("attn", p): f"self_attn.{p}_proj" for p in "qkvo"} | {
    ("mlp", p): f"mlp.{p}_proj" for p in ("gate", "up", "down")}


def save_peft(model: Transformer, adapters: dict, spec: LoraSpec, path, base_model_name_or_path: str = "") -> None:
    """Write the adapters alone in the PEFT format that `peft.PeftModel.from_pretrained` loads on top
    of the base saved by `rlhf_jax.models.save_pretrained`: `adapter_config.json` (peft_type LORA,
    r, lora_alpha, target_modules) + `adapter_model.safetensors` with fp32
    `base_model.model.model.layers.{i}.<module>.lora_A.weight [r, in]` and `lora_B.weight [out, r]`.
    Llama-family LMs (Llama, Qwen2, Mistral) only: ValueError for GPT-2 (its fused c_attn has one
    adapter for q|k|v) or a model with a value head (use `save_merged` there)."""
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    from rlhf_jax.models.hf_config import hf_model_type

    if spec.modules_to_save:
        raise ValueError(f"save_peft: modules_to_save={spec.modules_to_save} are trained in full; use "
                         "lora.save_merged for a plain Hugging Face model")
    if hf_model_type(model.config) == "gpt2" or tuple(model.heads) != ("lm",):
        raise ValueError(f"save_peft: Llama-family language models only (got {hf_model_type(model.config)}, heads "
                         f"{tuple(model.heads)}); use lora.save_merged for a plain Hugging Face model")
    tensors, targets = {}, set()
    for group, projections in adapters["layers"].items():
        for proj, leaves in projections.items():
            module = _HF_MODULES[(group, proj)]
            targets.add(module.split(".")[-1])
            a, b = np.asarray(leaves["kernel_lora_a"], np.float32), np.asarray(leaves["kernel_lora_b"], np.float32)
            for i in range(model.config.n_layers):
                name = f"base_model.model.model.layers.{i}.{module}"
                tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
                tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None}
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
