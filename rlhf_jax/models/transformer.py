"""One decoder-only Transformer (Flax Linen) for GPT-2 and the Llama family (Llama, Qwen2, Mistral).

Read top to bottom: config -> norms/rope -> attention -> MLP -> block -> model.

- Architecture: Vaswani et al. 2017 (attention), Radford et al. 2019 (GPT-2: learned positions,
  pre-norm LayerNorm, GELU, tied embeddings), Touvron et al. 2023 (Llama: RMSNorm of Zhang &
  Sennrich 2019, SwiGLU of Shazeer 2020, rotary positions of Su et al. 2021), grouped-query
  attention (Ainslie et al. 2023), Mistral's sliding window (Jiang et al. 2023).
- Parameters live outside the module: `model.apply({"params": params}, input_ids, ...)` is pure.
  Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `layers`);
  `rlhf_jax.sharding` maps them to mesh axes with one rules table.
- Layers are stacked with `nn.scan` (parameters get a leading `layers` axis).
- Padding is on the left. `attention_mask [B, T]` is 1 on real tokens; position ids default to
  `cumsum(mask) - 1`, so a left-padded row gives the same outputs as the unpadded sequence.
- Compute runs in `config.dtype` (bf16 on accelerators); parameters, norms, softmax, logits and
  values are fp32.
- KV-cache decoding (generation) lives in `rlhf_jax.models.decode`; passing `cache=` is the one
  switch to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models import heads as heads_lib
from rlhf_jax.models.matmul import matmul

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a decoder-only Transformer. Defaults give a tiny Llama-style model."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None means n_heads
    head_dim: Optional[int] = None  # None means d_model // n_heads
    d_ff: int = 256
    max_len: int = 512  # learned position table size (GPT-2); longest sequence for RoPE models
    positions: str = "rope"  # "rope" (Llama family) or "learned" (GPT-2)
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # "swiglu" (gate/up/down with SiLU) or "gelu" (GELU, tanh approximation)
    attn_bias: bool = False  # bias on q, k, v and output projections (GPT-2)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    tie_embeddings: bool = False  # LM head reuses the token embedding (GPT-2)
    sliding_window: Optional[int] = None  # Mistral: keys further back than this are masked
    dropout_rate: float = 0.0  # residual and embedding dropout; only active when not deterministic
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # recompute each block in the backward pass to save memory

    def __post_init__(self):
        problems = []
        if self.positions not in ("rope", "learned"):
            problems.append(f"positions={self.positions!r} (allowed: 'rope', 'learned')")
        if self.norm not in ("rmsnorm", "layernorm"):
            problems.append(f"norm={self.norm!r} (allowed: 'rmsnorm', 'layernorm')")
        if self.mlp not in ("swiglu", "gelu"):
            problems.append(f"mlp={self.mlp!r} (allowed: 'swiglu', 'gelu')")
        if self.head_dim is None and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r} (allowed: 'float32', 'bfloat16', 'float16')")
        if problems:
            raise ValueError("TransformerConfig: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def gpt2(cls, **overrides) -> "TransformerConfig":
        """GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings."""
        base = dict(positions="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                    attn_bias=True, mlp_bias=True, tie_embeddings=True)
        return cls(**{**base, **overrides})

    @classmethod
    def llama(cls, **overrides) -> "TransformerConfig":
        """Llama family (Qwen2 adds qkv_bias=True, Mistral adds sliding_window)."""
        base = dict(positions="rope", norm="rmsnorm", mlp="swiglu")
        return cls(**{**base, **overrides})


@flax.struct.dataclass
class ModelOutput:
    """`logits [B, T, V]` (LM head), `values [B, T]` (scalar head), updated KV `cache` (decoding only)."""

    logits: Optional[Array] = None
    values: Optional[Array] = None
    cache: Optional[tuple] = None


def default_position_ids(attention_mask: Array) -> Array:
    """Position of each slot counted over real tokens only: left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class Dense(nn.Module):
    """`x @ kernel (+ bias)` in the compute dtype; fp32 `kernel [in, out]` with logical `axes`."""

    features: int
    axes: tuple
    use_bias: bool
    dtype: Any
    bias_axis: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        # jnp.asarray, not .astype: a QLoRA base kernel is qwix's quantised WithAux, which qwix casts
        # through its jnp.asarray interception (rlhf_jax.lora); for an array the two are the same.
        y = matmul(x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.bias_axis or self.axes[-1],)),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Norm(nn.Module):
    """RMSNorm or LayerNorm, computed in fp32 and cast back to the compute dtype."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (cfg.d_model,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps) * scale
        else:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                              (cfg.d_model,), jnp.float32)
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias
        return y.astype(cfg.compute_dtype)


def rope_tables(position_ids: Array, head_dim: int, theta: float):
    """cos/sin `[B, T, head_dim]` for rotary embeddings (halves convention, as in HF Llama)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate `x [B, T, H, D]` by position: x·cos + rotate_half(x)·sin, in fp32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def qkv_projections(cfg: TransformerConfig, x: Array, rope) -> tuple:
    """Submodules `q`, `k`, `v` of the calling (compact) module applied to `x [B, T, d_model]`, with
    RoPE: `q [B, T, KVH, G, D]` (G = n_heads / kv_heads query heads share a kv head), `k` and
    `v [B, KVH, T, D]`."""
    dt, h, kvh, d = cfg.compute_dtype, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    bias = cfg.attn_bias or cfg.qkv_bias
    batch, q_len, _ = x.shape
    q = Dense(h * d, ("embed", "heads"), bias, dt, name="q")(x).reshape(batch, q_len, h, d)
    k = Dense(kvh * d, ("embed", "kv"), bias, dt, name="k")(x).reshape(batch, q_len, kvh, d)
    v = Dense(kvh * d, ("embed", "kv"), bias, dt, name="v")(x).reshape(batch, q_len, kvh, d)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3).astype(dt)
    return q.reshape(batch, q_len, kvh, h // kvh, d), k, v


def allowed_keys(query_slot: Array, key_slot: Array, key_mask: Array, sliding_window: Optional[int]) -> Array:
    """`[B, 1, 1, Q, K]` bool: real keys (`key_mask [B, K]`), not in the future, inside the window."""
    allowed = key_slot <= query_slot
    if sliding_window is not None:
        allowed &= query_slot - key_slot < sliding_window
    return allowed[None, None, None] & key_mask.astype(bool)[:, None, None, None, :]


def masked_scores(q: Array, keys: Array, allowed: Array) -> Array:
    """Scaled dot products `[B, KVH, G, Q, K]` in fp32; disallowed keys get the fp32 minimum."""
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, keys, preferred_element_type=jnp.float32)
    return jnp.where(allowed, scores / jnp.sqrt(jnp.float32(q.shape[-1])), jnp.finfo(jnp.float32).min)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention: softmax(q·kᵀ/√d)·v over allowed keys."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, key_mask, rope):
        cfg = self.config
        batch, q_len, _ = x.shape
        q, k, v = qkv_projections(cfg, x, rope)
        slots = jnp.arange(q_len)
        allowed = allowed_keys(slots[:, None], slots[None, :], key_mask, cfg.sliding_window)
        probs = jax.nn.softmax(masked_scores(q, k, allowed), axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bhkd,bhgqk->bqhgd", v, probs).reshape(batch, q_len, -1)
        return Dense(cfg.d_model, ("heads", "embed"), cfg.attn_bias, cfg.compute_dtype, "embed", name="o")(out)


class MLP(nn.Module):
    """SwiGLU (Llama family) or GELU (GPT-2) feed-forward block."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.compute_dtype
        if cfg.mlp == "swiglu":
            gate = Dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, name="gate")(x)
            up = Dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, name="up")(x)
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(Dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, name="up")(x), approximate=True)
        return Dense(cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, dt, "embed", name="down")(hidden)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). Scanned over layers."""

    config: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, key_mask, rope):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        x = x + drop(Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), key_mask, rope))
        x = x + drop(MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
        return x, None


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Decoder trunk plus heads: "lm" gives `logits`, "value" gives per-token scalar `values`.

    Policy/reference: heads=("lm",). Reward model and critic: heads=("value",) (the reward is the
    value at the last real token, see `heads.last_token_values`). Shared-trunk actor-critic:
    heads=("lm", "value").
    """

    config: TransformerConfig
    heads: tuple = ("lm",)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache=None,
                 cache_index=0, deterministic: bool = True, heads_from: int = 0) -> ModelOutput:
        """`input_ids [B, T]` int -> `ModelOutput` (fp32 `logits [B, T, V]` / `values [B, T]`).

        `heads_from`: heads (final norm, LM / value head) at slots `heads_from:` only, as a Python
        slice start: -1 is the last slot (outputs `[B, 1, ...]`).
        `cache` (with `cache_index`): KV-cache decoding, see `rlhf_jax.models.decode`; it needs
        `decode.unstack_layers(params)`, an `attention_mask` over all cache slots and `position_ids`.
        """
        cfg = self.config
        unknown = set(self.heads) - {"lm", "value"}
        if unknown:
            raise ValueError(f"Transformer.heads has unknown entries {sorted(unknown)} (allowed: 'lm', 'value')")
        if cache is not None and (attention_mask is None or position_ids is None):
            raise ValueError("Transformer: with a cache, pass attention_mask (every cache slot) and position_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="embed")
        x = embed(input_ids)
        rope = None
        if cfg.positions == "learned":
            x = x + nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                             embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                                         (None, "embed")),
                             name="pos_embed")(position_ids)
        else:
            rope = rope_tables(position_ids, cfg.dim_per_head, cfg.rope_theta)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)

        if cache is None:
            block = nn.remat(Block, static_argnums=()) if cfg.remat else Block
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="layers")
            x, _ = layers(x, attention_mask, rope)
        else:
            from rlhf_jax.models import decode  # decode builds on this file's layers
            x, cache = decode.cached_layers(self, x, cache, attention_mask, rope, cache_index)
        if heads_from:
            x = x[:, heads_from:]
        x = Norm(cfg, name="final_norm")(x)

        logits = values = None
        if "lm" in self.heads:
            logits = heads_lib.LMHead(cfg, name=None if cfg.tie_embeddings else "lm_head")(
                x, embed.embedding if cfg.tie_embeddings else None)
        if "value" in self.heads:
            values = heads_lib.ScalarHead(cfg.d_model, name="value_head")(x)
        return ModelOutput(logits=logits, values=values, cache=cache)


def init_params(model: Transformer, rng: Array, seq_len: int = 8) -> Any:
    """Fresh fp32 parameters (boxed logical-axis metadata removed)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(rng, ids)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(model: Transformer, seq_len: int = 8) -> Any:
    """Pytree of `PartitionSpec`s of logical axis names, matching the parameter tree."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return nn.get_partition_spec(abstract)["params"]
