"""The Transformer on its own: padding invariance, KV cache = full forward, GQA = repeated heads,
sliding window reach, heads, logical axes, config validation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (
    Transformer,
    TransformerConfig,
    default_position_ids,
    init_params,
    last_token_index,
    last_token_values,
    lm_params_to_scalar,
    param_logical_axes,
)
from rlhf_jax.models import heads as heads_lib
from rlhf_jax.models import decode
from rlhf_jax.models import matmul as matmul_lib
from rlhf_jax.models import transformer as transformer_lib
from rlhf_jax.models.matmul import matmul

VOCAB = 61
CONFIGS = {
    "gpt2": TransformerConfig.gpt2(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, max_len=32),
    "llama-gqa": TransformerConfig.llama(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64),
}


def _random_params(model, seed=0, scale=0.3):
    """N(0, scale²) everywhere except norm scales (1 + noise): outputs far from the init regime."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))

    def draw(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + scale * rng.randn(*s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, mask=None, positions=None, cache=None, cache_index=0):
    """`model.apply` compiled once per model and shapes (cache_index is traced, not baked in)."""
    return model.apply({"params": params}, ids, mask, positions, cache=cache, cache_index=cache_index)


def _logits(model, params, ids, mask=None):
    return np.asarray(_forward(model, params, ids, mask).logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padding_gives_the_unpadded_logits(name):
    model = Transformer(CONFIGS[name])
    params = _random_params(model)
    ids = np.random.RandomState(1).randint(1, VOCAB, (1, 6))
    padded_ids = np.concatenate([np.zeros((1, 3), np.int64), ids], 1)
    padded_mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 6))], 1).astype(np.int32)
    unpadded = _logits(model, params, ids)
    padded = _logits(model, params, padded_ids, padded_mask)
    np.testing.assert_allclose(padded[:, 3:], unpadded, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name):
    """The decode path `generate` uses (decode layout: per-layer parameters and caches): prefill 5
    left-padded slots, then feed 3 tokens one at a time; the logits equal one plain full pass."""
    cfg = CONFIGS[name]
    model = Transformer(cfg)
    params = _random_params(model, seed=2)
    per_layer = decode.unstack_layers(params)
    assert len(per_layer["layers"]) == cfg.n_layers
    np.testing.assert_array_equal(per_layer["layers"][1]["attn"]["q"]["kernel"],
                                  params["layers"]["attn"]["q"]["kernel"][1])
    ids = np.random.RandomState(3).randint(1, VOCAB, (2, 8))
    mask = np.ones((2, 8), np.int32)
    mask[1, :2] = 0
    full = _logits(model, params, ids, mask)
    positions = np.asarray(default_position_ids(mask))

    # prefill at slot 0 (a Python int: no cache reads), every slot's logits and the last slot's alone
    cache_mask = np.concatenate([mask[:, :5], np.zeros((2, 3), np.int32)], 1)
    prefill = lambda heads_from: model.apply({"params": per_layer}, ids[:, :5], cache_mask, positions[:, :5],
                                             cache=decode.init_cache(cfg, 2, 8), cache_index=0, heads_from=heads_from)
    out = prefill(0)
    assert len(out.cache) == cfg.n_layers and out.cache[0]["k"].shape == (2, cfg.kv_heads, 8, cfg.dim_per_head)
    last_only = prefill(-1)
    assert last_only.logits.shape == (2, 1, VOCAB)
    np.testing.assert_allclose(last_only.logits, full[:, 4:5], atol=1e-5)
    step_logits = [np.asarray(out.logits)]
    for t in range(5, 8):
        cache_mask[:, t] = 1
        out = _forward(model, per_layer, ids[:, t:t + 1], cache_mask, positions[:, t:t + 1], out.cache, t)
        step_logits.append(np.asarray(out.logits))
    incremental = np.concatenate(step_logits, 1)
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-5)
    with pytest.raises(ValueError, match="unstack_layers"):  # stacked parameters with a cache
        model.apply({"params": params}, ids[:, :5], cache_mask, positions[:, :5], cache=decode.init_cache(cfg, 2, 8))


def test_heads_from_gives_the_full_pass_heads_at_those_slots():
    """`heads_from=k`: the LM and value heads of slots k.. only, equal to the full pass there."""
    cfg = CONFIGS["llama-gqa"]
    model = Transformer(cfg, heads=("lm", "value"))
    params = _random_params(model, seed=21)
    ids = np.random.RandomState(22).randint(1, VOCAB, (2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0  # left padding
    full = model.apply({"params": params}, ids, mask)
    part = model.apply({"params": params}, ids, mask, heads_from=4)
    assert part.logits.shape == (2, 5, VOCAB) and part.values.shape == (2, 5)
    np.testing.assert_allclose(part.logits, full.logits[:, 4:], atol=1e-5)
    np.testing.assert_allclose(part.values, full.values[:, 4:], atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 kv heads = MHA with 4 heads whose k/v projections repeat each kv head twice."""
    gqa_cfg = CONFIGS["llama-gqa"]
    gqa = Transformer(gqa_cfg)
    params = _random_params(gqa, seed=4)
    mha = Transformer(gqa_cfg.replace(n_kv_heads=None))
    head_dim, groups = gqa_cfg.dim_per_head, gqa_cfg.n_heads // gqa_cfg.kv_heads

    def repeat_heads(kernel):  # [L, d, kvh*hd] -> [L, d, kvh*groups*hd], query head h uses kv head h // groups
        layers, d, _ = kernel.shape
        per_head = kernel.reshape(layers, d, gqa_cfg.kv_heads, 1, head_dim)
        return jnp.broadcast_to(per_head, (layers, d, gqa_cfg.kv_heads, groups, head_dim)).reshape(layers, d, -1)

    attn = dict(params["layers"]["attn"])
    for name in ("k", "v"):
        attn[name] = {"kernel": repeat_heads(attn[name]["kernel"])}
    mha_params = {**params, "layers": {**params["layers"], "attn": attn}}
    ids = np.random.RandomState(5).randint(0, VOCAB, (2, 7))
    np.testing.assert_allclose(_logits(mha, mha_params, ids), _logits(gqa, params, ids), atol=1e-5)


def test_sliding_window_reach():
    """Window 3, 2 layers: position t sees tokens back to t - 2·(3-1) = t - 4 and nothing earlier."""
    cfg = CONFIGS["llama-gqa"].replace(sliding_window=3)
    model = Transformer(cfg)
    params = _random_params(model, seed=6)
    ids = np.random.RandomState(7).randint(1, VOCAB, (1, 9))
    changed = ids.copy()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    diff = np.abs(_logits(model, params, ids) - _logits(model, params, changed)).max(-1)[0]
    assert (diff[:5] > 1e-4).all()  # positions 0..4 reach token 0
    np.testing.assert_allclose(diff[5:], 0.0, atol=1e-6)  # positions 5.. do not
    full_model = Transformer(cfg.replace(sliding_window=None))
    diff_full = np.abs(_logits(full_model, params, ids) - _logits(full_model, params, changed)).max(-1)[0]
    assert (diff_full > 1e-4).all()


def test_reward_head_reads_the_last_real_token():
    values = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])  # right-, un-, left+right-padded
    np.testing.assert_array_equal(np.asarray(last_token_index(mask)), [2, 3, 2])
    np.testing.assert_array_equal(np.asarray(last_token_values(values, mask)), [3.0, 8.0, 11.0])


def test_lm_params_to_scalar_builds_a_reward_model():
    cfg = CONFIGS["llama-gqa"]
    lm = Transformer(cfg)
    lm_params = _random_params(lm, seed=8)
    rm_params = lm_params_to_scalar(lm_params, jax.random.PRNGKey(1), cfg.d_model)
    assert "lm_head" not in rm_params and rm_params["value_head"]["kernel"].shape == (cfg.d_model, 1)
    std = float(np.std(np.asarray(rm_params["value_head"]["kernel"])))
    assert 0.5 / (cfg.d_model + 1) ** 0.5 < std < 1.5 / (cfg.d_model + 1) ** 0.5  # N(0, 1/(d+1)) init
    rm = Transformer(cfg, heads=("value",))
    out = _forward(rm, rm_params, jnp.ones((2, 5), jnp.int32))
    assert out.logits is None and out.values.shape == (2, 5) and out.values.dtype == jnp.float32
    # The trunk is shared unchanged: values = final hidden state · value kernel, with the LM's trunk.
    both = Transformer(cfg, heads=("lm", "value"))
    shared = _forward(both, {**lm_params, "value_head": rm_params["value_head"]}, jnp.ones((2, 5), jnp.int32))
    np.testing.assert_allclose(np.asarray(shared.values), np.asarray(out.values), atol=1e-6)


def test_logical_axes_cover_every_parameter():
    model = Transformer(CONFIGS["gpt2"], heads=("lm", "value"))
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    axes = param_logical_axes(model)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    specs = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for path, leaf in leaves:
        assert len(specs[path]) == leaf.ndim, jax.tree_util.keystr(path)
    assert specs[next(p for p, _ in leaves if "embed" in jax.tree_util.keystr(p))] == jax.sharding.PartitionSpec(
        "vocab", "embed")
    q_path = next(p for p, _ in leaves if jax.tree_util.keystr(p).endswith("['q']['kernel']"))
    assert specs[q_path] == jax.sharding.PartitionSpec("layers", "embed", "heads")


@pytest.mark.parametrize("x_shape", [(4, 5), (2, 3, 5)])
def test_matmul_vjp_equals_autodiff(x_shape):
    rng = np.random.RandomState(11)
    x, w = jnp.asarray(rng.randn(*x_shape), jnp.float32), jnp.asarray(rng.randn(5, 7), jnp.float32)
    probe = jnp.asarray(rng.randn(*x_shape[:-1], 7), jnp.float32)  # a loss whose gradient is not all ones
    ours = lambda x, w: jnp.sum(jnp.sin(matmul(x, w)) * probe)
    autodiff = lambda x, w: jnp.sum(jnp.sin(jnp.matmul(x, w)) * probe)
    np.testing.assert_array_equal(matmul(x, w), jnp.matmul(x, w))
    assert "custom_vjp_call" in str(jax.make_jaxpr(matmul)(x, w))  # the tests run on CPU: the custom VJP
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(autodiff, (0, 1))(x, w)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # bf16 operands, fp32 output (the LM head): gradients in the operands' dtype, close to autodiff's
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    ours16 = lambda x, w: jnp.sum(jnp.sin(matmul(x, w, jnp.float32)) * probe)
    auto16 = lambda x, w: jnp.sum(jnp.sin(jnp.matmul(x, w, preferred_element_type=jnp.float32)) * probe)
    assert matmul(xb, wb, jnp.float32).dtype == jnp.float32
    for got, want in zip(jax.grad(ours16, (0, 1))(xb, wb), jax.grad(auto16, (0, 1))(xb, wb)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0.02, atol=0.05)


def test_matmul_is_plain_jnp_matmul_off_the_custom_vjp_backends(monkeypatch):
    x, w = jnp.ones((3, 4)), jnp.ones((4, 2))
    monkeypatch.setattr(matmul_lib, "CUSTOM_VJP_BACKENDS", ())
    assert "custom_vjp_call" not in str(jax.make_jaxpr(matmul)(x, w))
    np.testing.assert_array_equal(matmul(x, w), np.full((3, 2), 4.0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_gradients_equal_plain_autodiff(name, monkeypatch):
    """Every projection goes through `matmul`; swapping in jnp.matmul (JAX's own VJP) must give the
    same parameter gradients (biases, the scanned layers and tied embeddings included)."""
    model = Transformer(CONFIGS[name])
    params = _random_params(model, seed=12)
    ids = jnp.asarray(np.random.RandomState(13).randint(0, VOCAB, (2, 7)))

    def loss(params):
        logits = model.apply({"params": params}, ids).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    ours = jax.grad(loss)(params)
    plain = lambda x, w, out_dtype=None: jnp.matmul(x, w, preferred_element_type=out_dtype)
    monkeypatch.setattr(transformer_lib, "matmul", plain)
    monkeypatch.setattr(heads_lib, "matmul", plain)
    reference = jax.grad(loss)(params)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_remat_gives_the_same_gradients():
    """`remat=True` recomputes each block in the backward pass (through `matmul`'s custom VJP):
    the gradients must not change."""
    cfg = CONFIGS["llama-gqa"]
    params = _random_params(Transformer(cfg), seed=14)
    ids = jnp.asarray(np.random.RandomState(15).randint(0, VOCAB, (2, 7)))

    def grads(config):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(Transformer(config).apply({"params": p}, ids).logits)[..., 5])
        return jax.grad(loss)(params)

    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads(cfg.replace(remat=True))),
                                 jax.tree_util.tree_leaves(grads(cfg))):
        # recomputation changes the float order: ~1e-6 apart, with jnp.matmul's own VJP as well
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = CONFIGS["llama-gqa"]
    params = _random_params(Transformer(cfg), seed=9)
    ids = np.random.RandomState(10).randint(0, VOCAB, (2, 6))
    out32 = _logits(Transformer(cfg), params, ids)
    out16 = Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params}, jnp.asarray(ids)).logits
    assert out16.dtype == jnp.float32
    assert np.abs(np.asarray(out16) - out32).max() < 0.05 * np.abs(out32).max()  # bf16 has ~3 significant digits


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match=r"norm='batchnorm' \(allowed: 'rmsnorm', 'layernorm'\)"):
        TransformerConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown entries"):
        Transformer(TransformerConfig(), heads=("policy",)).init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))
