"""One decoder-only Transformer (Flax Linen) for GPT-2 and the Llama family (Llama, Qwen2, Mistral).

Read top to bottom: config -> norms/rope -> attention -> MLP -> block -> model.

Conventions
- Parameters live outside the module: `model.apply({"params": params}, input_ids, ...)` is pure.
- Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `layers`);
  `rlhf_jax.sharding` maps them to mesh axes with one rules table.
- Layers are stacked with `nn.scan` (parameters get a leading `layers` axis): compile time does
  not grow with depth.
- Padding is on the left. `attention_mask` is 1 on real tokens; position ids default to
  `cumsum(mask) - 1`, so a left-padded row gives the same outputs as the unpadded sequence.
- KV cache: a dict of head-major `[layers, batch, kv_heads, max_len, head_dim]` arrays passed in
  and out explicitly (head-major: attention reads each head's keys contiguously, no transpose).
  With a cache, `attention_mask` covers all `max_len` slots and the new tokens are written at
  slots `[cache_index, cache_index + T)`.
- Decode layout (`unstack_layers`, `init_layer_caches`): parameters and cache as tuples of
  per-layer trees, layers unrolled. Inside a decode `while_loop` this avoids the per-step copies
  that slicing stacked arrays costs on CPU (XLA materialises every layer slice of the parameters
  and of the cache); the results are the same as with stacked arrays.
- Compute runs in `config.dtype` (bf16 on accelerators); norms, softmax, logits and values are fp32.
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
    """`logits [B, T, V]` (LM head), `values [B, T]` (scalar head), updated KV `cache`."""

    logits: Optional[Array] = None
    values: Optional[Array] = None
    cache: Optional[dict] = None


def init_cache(config: TransformerConfig, batch_size: int, max_len: int) -> dict:
    """Zeroed stacked KV cache `[layers, batch, kv_heads, max_len, head_dim]`, in the compute dtype."""
    shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.dim_per_head)
    return {"k": jnp.zeros(shape, config.compute_dtype), "v": jnp.zeros(shape, config.compute_dtype)}


def init_layer_caches(config: TransformerConfig, batch_size: int, max_len: int) -> tuple:
    """Zeroed KV cache in the decode layout: one `{"k", "v"}` of `[batch, kv_heads, max_len, head_dim]`
    per layer (use with `unstack_layers` parameters)."""
    shape = (batch_size, config.kv_heads, max_len, config.dim_per_head)
    return tuple({"k": jnp.zeros(shape, config.compute_dtype), "v": jnp.zeros(shape, config.compute_dtype)}
                 for _ in range(config.n_layers))


def unstack_layers(params: dict) -> dict:
    """Parameters in the decode layout: `params["layers"]` (stacked over a leading layer axis) becomes
    a tuple of per-layer trees. Do this once, outside a decode loop."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    n_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree_util.tree_map(lambda p: p[i], stacked) for i in range(n_layers))}


def default_position_ids(attention_mask: Array) -> Array:
    """Position of each slot counted over real tokens only: left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s dot_general (contract lhs's last axis with the kernel's first) via `matmul`."""
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    if (tuple(lhs_contract), tuple(rhs_contract), batch_dims) != ((lhs.ndim - 1,), (0,), ((), ())) or precision:
        raise ValueError(f"_dense_dot_general: only Dense's x @ kernel form, got {dimension_numbers}, "
                         f"precision={precision}")
    return matmul(lhs, rhs, preferred_element_type)


def _dense(features, axes, use_bias, dtype, name, bias_axis=None, init_std=0.02):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=_dense_dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (bias_axis or axes[-1],)),
        name=name,
    )


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


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with an optional KV cache."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, layer_cache, key_mask, rope, cache_index):
        cfg = self.config
        dt = cfg.compute_dtype
        h, kvh, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attn_bias or cfg.qkv_bias
        batch, q_len, _ = x.shape
        q = _dense(h * d, ("embed", "heads"), bias, dt, "q")(x).reshape(batch, q_len, h, d)
        k = _dense(kvh * d, ("embed", "kv"), bias, dt, "k")(x).reshape(batch, q_len, kvh, d)
        v = _dense(kvh * d, ("embed", "kv"), bias, dt, "v")(x).reshape(batch, q_len, kvh, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3).astype(dt)  # [B, KVH, T, D]
        q = q.reshape(batch, q_len, kvh, h // kvh, d)

        # Keys: the T new ones, and with a cache also the slots written before `cache_index`. The
        # cache is only read here and updated at the end, so XLA updates it in place (reading the
        # updated cache instead makes it copy the whole cache every decode step on CPU).
        query_slot = cache_index + jnp.arange(q_len)[:, None]
        new_slot = cache_index + jnp.arange(q_len)[None, :]
        key_mask = key_mask.astype(bool)
        new_mask = key_mask if layer_cache is None else jax.lax.dynamic_slice_in_dim(key_mask, cache_index, q_len, 1)
        parts = [(k, v, self._allowed(query_slot, new_slot, new_mask))]
        if layer_cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
            old_slot = jnp.arange(layer_cache["k"].shape[2])[None, :]
            old_mask = key_mask & (old_slot < cache_index)
            parts.insert(0, (layer_cache["k"], layer_cache["v"], self._allowed(query_slot, old_slot, old_mask)))

        scores = [jnp.where(allowed, jnp.einsum("bqhgd,bhkd->bhgqk", q, keys, preferred_element_type=jnp.float32)
                            / jnp.sqrt(jnp.float32(d)), jnp.finfo(jnp.float32).min)
                  for keys, _, allowed in parts]
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dt)
        out, offset = 0.0, 0
        # values first: with a single query XLA:CPU otherwise transposes the whole V cache every decode step
        for (_, values, _), part in zip(parts, scores):
            width = part.shape[-1]
            out = out + jnp.einsum("bhkd,bhgqk->bqhgd", values, probs[..., offset:offset + width])
            offset += width
        out = out.reshape(batch, q_len, h * d)
        if layer_cache is not None:
            # Write after the reads above. The zero term (x * 0 is not folded for floats) makes the written
            # values depend on the attention output, so XLA can order the in-place update after the reads;
            # otherwise it copies both caches every decode step (an optimization_barrier does not help).
            after_reads = (0.0 * out[:, 0, 0]).astype(dt)[:, None, None, None]
            layer_cache = {
                "k": jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k + after_reads, cache_index, axis=2),
                "v": jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v + after_reads, cache_index, axis=2)}
        out = _dense(cfg.d_model, ("heads", "embed"), cfg.attn_bias, dt, "o", bias_axis="embed")(out)
        return out, layer_cache

    def _allowed(self, query_slot, key_slot, key_mask):
        """`[B, 1, 1, T, K]`: real keys, not in the future, inside the sliding window."""
        allowed = key_slot <= query_slot
        if self.config.sliding_window is not None:
            allowed &= query_slot - key_slot < self.config.sliding_window
        return allowed[None, None, None] & key_mask[:, None, None, None, :]


class MLP(nn.Module):
    """SwiGLU (Llama family) or GELU (GPT-2) feed-forward block."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.compute_dtype
        if cfg.mlp == "swiglu":
            gate = _dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, "gate")(x)
            up = _dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, "up")(x)
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(_dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, dt, "up")(x), approximate=True)
        return _dense(cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, dt, "down", bias_axis="embed")(hidden)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). Scanned over layers."""

    config: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, key_mask, rope, cache_index):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        attn_out, layer_cache = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(x), layer_cache, key_mask, rope, cache_index)
        x = x + drop(attn_out)
        x = x + drop(MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
        return x, layer_cache


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
        """`heads_from`: heads (final norm, LM / value head) at slots `heads_from:` only, as a Python
        slice start: -1 is the last slot (a prefill before sampling, outputs `[B, 1, ...]`); PPO
        passes the last prompt slot, so the LM head skips the rest of the prompt."""
        cfg = self.config
        unknown = set(self.heads) - {"lm", "value"}
        if unknown:
            raise ValueError(f"Transformer.heads has unknown entries {sorted(unknown)} (allowed: 'lm', 'value')")
        batch, q_len = input_ids.shape
        unrolled = isinstance(cache, tuple) or (
            not self.is_initializing() and isinstance(self.variables["params"].get("layers"), tuple))
        if attention_mask is None:
            key_len = q_len if cache is None else (cache[0] if unrolled else cache)["k"].shape[-2]
            attention_mask = jnp.ones((batch, key_len), jnp.int32)
        if position_ids is None:
            position_ids = jax.lax.dynamic_slice_in_dim(
                default_position_ids(attention_mask), cache_index, q_len, axis=1)

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

        if unrolled:
            x, cache = self._unrolled_layers(x, cache, attention_mask, rope, cache_index, deterministic)
        else:
            block = nn.remat(Block, static_argnums=()) if cfg.remat else Block
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="layers")
            x, cache = layers(x, cache, attention_mask, rope, cache_index)
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


    def _unrolled_layers(self, x, caches, attention_mask, rope, cache_index, deterministic):
        """The blocks one after another with per-layer parameters and caches (decode layout)."""
        layer_params = self.variables["params"].get("layers")
        if not isinstance(layer_params, tuple) or not (caches is None or isinstance(caches, tuple)):
            raise ValueError("Transformer: a per-layer cache (init_layer_caches) needs per-layer parameters "
                             "(unstack_layers) and vice versa; got params['layers'] of type "
                             f"{type(layer_params).__name__} and a cache of type {type(caches).__name__}")
        if len(layer_params) != self.config.n_layers:
            raise ValueError(f"Transformer: params['layers'] has {len(layer_params)} layers, "
                             f"config.n_layers={self.config.n_layers}")
        new_caches = []
        for i, params in enumerate(layer_params):
            rngs = {} if deterministic or self.config.dropout_rate == 0 else {
                "dropout": jax.random.fold_in(self.make_rng("dropout"), i)}
            x, layer_cache = Block(self.config, deterministic, parent=None).apply(
                {"params": params}, x, None if caches is None else caches[i], attention_mask, rope, cache_index,
                rngs=rngs)
            new_caches.append(layer_cache)
        return x, None if caches is None else tuple(new_caches)


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
