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

QLoRA (Dettmers et al. 2023): `LoraSpec.quantize` "int8" or "nf4" stores the frozen kernels of the
adapted projections quantised, through qwix's own mechanism (`LoraProvider` extends its PTQ
provider): `quantize_base` turns each such fp32 `kernel [.., in, out]` into qwix's
`WithAux(QArray(qvalue [.., in, out] int8 | uint4 (nf4 codes), scale [.., in / block, out] fp32))`,
one absmax scale per `quantize_block` inputs of each output (64 = the QLoRA paper's block; 0 =
one per output channel), and the projection dequantises on the fly, `y = x·deq(W) + (alpha/r)·x·A·B`
(A, B fp32). Embeddings, norms, biases and heads stay fp32. The adapter-free model of a quantised
base is `base_model(model, spec)` (the same quantised kernels, no adapters).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from rlhf_jax.models import Transformer

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Attention (q, k, v, o) and MLP (gate, up, down) projections; "layers/" is the scanned training
# layout, the bare form the per-layer decode layout (rlhf_jax.models.decode).
DEFAULT_TARGETS = r"(layers/)?(attn/(q|k|v|o)|mlp/(gate|up|down))"
SAVABLE_MODULES = ("embed", "pos_embed", "final_norm", "lm_head", "value_head")
QTYPES = {"none": None, "int8": jnp.int8, "nf4": "nf4"}  # config.lora.quantize -> qwix weight_qtype


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r > 0; alpha (the update is scaled by alpha / r); dropout on the adapter's input
    (training only); target_modules: regex that must match a projection's whole module path
    (e.g. "layers/attn/q"); modules_to_save: top-level parameter groups trained in full alongside
    the adapters (PEFT's term): the trainers add "value_head" for a reward model or a shared critic;
    `config.lora.modules_to_save` may add "embed", "pos_embed", "final_norm", "lm_head";
    quantize: storage of the frozen adapted kernels, "none" (fp32) | "int8" | "nf4" (QLoRA);
    quantize_block: inputs per absmax scale (0 = one scale per output channel)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS
    modules_to_save: tuple = ()
    quantize: str = "none"
    quantize_block: int = 64
    key: str = dataclasses.field(default="config.lora", compare=False)  # the config section, for errors

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg, key: str = "config.lora", modules_to_save: tuple = ()) -> "LoraSpec | None":
        """`None` when `cfg.rank == 0` (LoRA off); ValueError naming the key for a bad value."""
        if cfg.rank == 0:
            if cfg.get("quantize", "none") != "none":
                raise ValueError(f"{key}.quantize={cfg.quantize!r} needs {key}.rank > 0 (QLoRA quantises the frozen "
                                 "base under LoRA adapters; with rank 0 every weight is trained in fp32)")
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
        if cfg.quantize not in QTYPES:
            raise ValueError(f"{key}.quantize={cfg.quantize!r} must be one of {', '.join(QTYPES)}")
        if cfg.quantize_block < 0:
            raise ValueError(f"{key}.quantize_block={cfg.quantize_block} must be >= 0 (0 = per output channel)")
        return cls(int(cfg.rank), float(cfg.alpha), float(cfg.dropout), cfg.target_modules,
                   tuple(dict.fromkeys(tuple(modules_to_save) + extra)), cfg.quantize, int(cfg.quantize_block), key)

    @classmethod
    def from_meta(cls, meta: dict) -> "LoraSpec":
        """Inverse of `meta` (no dropout: loading and merging)."""
        return cls(meta["rank"], meta["alpha"], 0.0, meta["target_modules"], tuple(meta["modules_to_save"]),
                   meta.get("quantize", "none"), meta.get("quantize_block", 64))

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    def meta(self) -> dict:
        """JSON-able description (checkpoint metadata)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules, "modules_to_save": list(self.modules_to_save),
                "quantize": self.quantize, "quantize_block": self.quantize_block}

    def rule_fields(self, model: Transformer) -> dict:
        """qwix rule fields of the base quantisation (`weight_qtype`, `tile_size`); ValueError naming
        `self.key`.quantize_block when the block does not divide a projection's input size, or
        `.rank` when it equals a projection's input or output size (qwix finds a quantised kernel
        among its module's params by shape, and A [in, r] / B [r, out] would then match too)."""
        if not self.quantized:
            return {}
        cfg = model.config
        inputs = {cfg.d_model, cfg.n_heads * cfg.dim_per_head, cfg.d_ff}
        sizes = sorted(inputs | {cfg.kv_heads * cfg.dim_per_head})
        for size in sorted(inputs):
            if self.quantize_block and size % self.quantize_block:
                raise ValueError(f"{self.key}.quantize_block={self.quantize_block} does not divide the projection "
                                 f"input size {size} (d_model {cfg.d_model}, d_ff {cfg.d_ff}, heads x head_dim "
                                 f"{cfg.n_heads * cfg.dim_per_head}); use a divisor or 0")
        if self.rank in sizes:
            raise ValueError(f"{self.key}.rank={self.rank} with {self.key}.quantize={self.quantize!r}: the rank equals "
                             f"a projection size of the model ({', '.join(map(str, sizes))}), and qwix tells a "
                             "quantised kernel from its adapters by shape; pick another rank")
        return {"weight_qtype": QTYPES[self.quantize], "tile_size": self.quantize_block or None}


class _MatmulIntercept:
    """Mixin for a qwix provider: also take over `rlhf_jax.models.matmul.matmul` (see module doc)."""

    def get_intercept_map(self):
        return super().get_intercept_map() | {"rlhf_jax.models.matmul.matmul": self._matmul}

    def _matmul(self, x, w, out_dtype=None):
        """As `matmul`: the result in `out_dtype`, else x's dtype (the fp32 adapters would otherwise
        promote a bf16 model's activations to fp32 and break `nn.scan`'s carry)."""
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return self.dot_general(x, w, dims, preferred_element_type=out_dtype).astype(out_dtype or x.dtype)


@functools.cache
def _nf4_table() -> tuple:
    """The 16 NF4 values (fp32), read from qwix itself: `qwix.dequantize` of the codes 0..15."""
    with jax.ensure_compile_time_eval():
        codes = qwix.QArray(jnp.arange(16, dtype=jnp.uint4), jnp.ones((16,), jnp.float32), None, "nf4")
        return tuple(np.asarray(qwix.dequantize(codes), np.float32))


def _nf4_values(codes: jax.Array) -> jax.Array:
    """fp32 NF4 value of each uint4 code, same shape as `codes`. qwix's own lookup goes through
    `codes.ravel()` (a 1-D gather), which loses a sharded kernel's layout, so XLA builds the whole
    fp32 kernel on every device; here it is elementwise (16 selects), so the sharding carries through."""
    codes = codes.astype(jnp.int32)
    out = jnp.zeros(codes.shape, jnp.float32)
    for i, value in enumerate(_nf4_table()):
        out = jnp.where(codes == i, value, out)
    return out


def _scale_blocks(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x [.., in, out] times its block scales [.., in / block, out] (qwix's generic broadcast)."""
    x_shape, s_shape = [], []
    for a, b in zip(x.shape, scale.shape):
        if a == b or b == 1:
            x_shape.append(a)
            s_shape.append(b)
        else:
            x_shape.extend((b, a // b))
            s_shape.extend((b, 1))
    return (x.reshape(x_shape) * scale.reshape(s_shape)).reshape(x.shape)


def dequantize_qarray(q) -> jax.Array:
    """`qwix.dequantize(q)`, the same values bit for bit, with an NF4 kernel's code lookup kept
    elementwise (`_nf4_values`): a sharded quantised kernel dequantises to a kernel sharded the same
    way (qwix's own NF4 path made XLA replicate it: plan_memory's QLoRA temporaries, up to +41 GiB
    per device for Llama-2-7B on 8 devices)."""
    if q.qtype != "nf4" or q.zero_point is not None:
        return qwix.dequantize(q)
    return _scale_blocks(_nf4_values(q.qvalue).astype(q.scale.dtype), q.scale)


def _dot_general(lhs, rhs, dimension_numbers, **kwargs):
    """qwix's `dot_general` for the PTQ providers, a quantised rhs dequantised by `dequantize_qarray`
    first (qwix takes the same dequantise-then-matmul path for a float lhs; module doc)."""
    if isinstance(rhs, qwix.QArray) and rhs.qtype == "nf4":
        rhs = dequantize_qarray(rhs)
    return qwix.dot_general(lhs, rhs, dimension_numbers, **kwargs)


class _Provider(_MatmulIntercept, qwix.LoraProvider):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dot_general_fn = _dot_general


class _QuantProvider(_MatmulIntercept, qwix.PtqProvider):
    def __init__(self, rules):
        super().__init__(rules, _dot_general_fn=_dot_general)


def lora_model(model: Transformer, spec: LoraSpec, *, train: bool = True) -> Transformer:
    """`model` with LoRA on the projections whose path matches `spec.target_modules`; its params are
    the base tree plus `*_lora_a [.., in, r]` / `*_lora_b [.., r, out]` fp32 leaves (the adapted
    kernels quantised when `spec.quantized`: `quantize_base`). `train=False` drops the adapter
    dropout (evaluation, generation). Raises ValueError if nothing matches."""
    rule = qwix.LoraRule(module_path=spec.target_modules, rank=spec.rank, alpha=spec.alpha,
                         dropout=spec.dropout if train else 0.0, **spec.rule_fields(model))
    return qwix.apply_lora_to_model(model, _Provider([rule]))


def base_model(model: Transformer, spec: LoraSpec) -> Transformer:
    """The adapter-free model whose params are `split(params, spec)[1]`: `model` itself, or for a
    quantised base the same projections dequantising qwix's stored kernels (no adapters)."""
    if not spec.quantized:
        return model
    rule = qwix.QuantizationRule(module_path=spec.target_modules, **spec.rule_fields(model))
    return qwix.quantize_model(model, _QuantProvider([rule]))


def is_quantized(x) -> bool:
    """A qwix-quantised kernel (`WithAux` of a `QArray`), which the tree helpers keep whole."""
    return type(x).__name__ == "WithAux" and hasattr(x, "array")


def quantize_base(model: Transformer, base: dict) -> dict:
    """`base` (fp32 plain params, or the frozen tree of `split`) with every kernel that the LoRA
    `model` (from `lora_model`) quantises replaced by qwix's quantised form (module doc); the
    scanned layers are quantised layer by layer, as qwix would inside the scan. Jit-able."""
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))

    def walk(node, shapes, scanned):
        out = {}
        for key, value in node.items():
            shape = shapes.get(key) if shapes is not None else None
            if isinstance(value, dict):
                out[key] = walk(value, shape, scanned or key == "layers")
            elif is_quantized(shape):
                how = shape.how
                quantize = functools.partial(qwix.quantize, qtype=how.qtype, channelwise_axes=how.channelwise_axes,
                                             tiled_axes=how.tiled_axes, calibration_method=how.calibration_method)
                out[key] = shape.replace(array=jax.vmap(quantize)(value) if scanned else quantize(value))
            else:
                out[key] = value
        return out
    return walk(base, abstract, False)


def dequantize(x):
    """fp32 array of a kernel (`quantize_base`'s quantised form or an array, returned as is)."""
    return dequantize_qarray(x.array) if is_quantized(x) else x


def _name(path) -> str:
    return getattr(path[-1], "key", str(path[-1]))


def is_adapter(path) -> bool:
    return _name(path).endswith(ADAPTER_SUFFIXES)


def _trainable(path, spec: LoraSpec) -> bool:
    return is_adapter(path) or getattr(path[0], "key", None) in spec.modules_to_save


def split(params: dict, spec: LoraSpec) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts: adapters and `spec.modules_to_save` vs the base weights."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
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
    adapters = jax.tree_util.tree_map_with_path(lambda p, x: x if is_adapter(p) else None, params,
                                                is_leaf=is_quantized)
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
    """Base-only params with every adapted kernel replaced by `W + (alpha / r)·A·B` (fp32; W
    dequantised for QLoRA, every quantised kernel too): the plain model on them computes what the
    LoRA model computes on `params` (up to rounding)."""
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
                out[key] = (dequantize(value) + spec.scale * delta).astype(a.dtype)
            else:
                out[key] = dequantize(value)
        return out
    return walk(params)


def count(tree) -> int:
    """Number of parameters (elements) in a pytree of arrays or ShapeDtypeStructs (a quantised
    kernel counts its weights, not its scales)."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(int(x.array.qvalue.size if is_quantized(x) else x.size) for x in leaves)


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
    adapter for q|k|v) or a model with a value head (use `save_merged` there). QLoRA adapters were
    trained on the quantised base: on the fp32 base they differ by the quantisation error
    (`save_merged` writes the dequantised merge exactly)."""
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
