"""QLoRA (config.lora.quantize): the frozen adapted kernels stored int8 / nf4 through qwix, the
quantised model's log-probs near the fp32 model's, dequantisation error within the format's bound,
gradients only on the adapters, the adapter-free model bit-equal to the zero-adapter one, bytes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import lora, sharding
from rlhf_jax.models import transformer as tr
from rlhf_jax.trainers import lora_state
from test_lora import CFG, IDS, MASK, assert_adapter_gradients_are_the_merged_models
# Max |log-prob - fp32 log-prob| over the valid tokens of this model, measured for init seeds 0-3
# (block 16): int8 6e-4 .. 1.0e-3, nf4 8e-3 .. 1.7e-2. The tolerances are about twice the worst.
TOLERANCE = {"int8": 2e-3, "nf4": 3e-2}
NF4_MAX_GAP = 0.3037  # widest gap between neighbouring NF4 code values (-1.0 .. -0.6962)


def spec_of(quantize, block=16):
    return lora.LoraSpec(rank=2, alpha=4.0, quantize=quantize, quantize_block=block)


@pytest.fixture(scope="module")
def base():
    model = tr.Transformer(CFG)
    return model, tr.init_params(model, jax.random.PRNGKey(0))


def logprobs(model, params):
    out = jax.jit(lambda p: jax.nn.log_softmax(model.apply({"params": p}, IDS, MASK).logits))(params)
    return np.asarray(out)[np.asarray(MASK) > 0]


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantised_base_logprobs_stay_near_fp32(base, quantize):
    model, params = base
    spec = spec_of(quantize)
    quantised = jax.jit(lambda p: lora.quantize_base(lora.lora_model(model, spec), p))(params)
    diff = np.abs(logprobs(lora.base_model(model, spec), quantised) - logprobs(model, params)).max()
    assert 0 < diff < TOLERANCE[quantize]


@pytest.mark.parametrize("quantize,bits", [("int8", 8), ("nf4", 4)])
def test_storage_and_dequantisation_error_bound(base, quantize, bits):
    """The stored codes are int8 / uint4 with one scale per 16 inputs of each output; every
    dequantised weight is within half a code step of the fp32 weight (int8: absmax / 127 steps;
    nf4: the widest NF4 gap times the block's absmax)."""
    model, params = base
    quantised = lora.quantize_base(lora.lora_model(model, spec_of(quantize)), params)
    kernel = quantised["layers"]["mlp"]["up"]["kernel"]
    assert kernel.array.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.uint4)
    assert kernel.array.qvalue.shape == (2, 16, 32) and kernel.array.scale.shape == (2, 1, 32)
    w = np.asarray(params["layers"]["mlp"]["up"]["kernel"])
    absmax = np.abs(w.reshape(2, 1, 16, 32)).max(axis=2, keepdims=True)
    step = absmax / 127 if bits == 8 else absmax * NF4_MAX_GAP
    err = np.abs(np.asarray(lora.dequantize(kernel)) - w).reshape(2, 1, 16, 32)
    assert (err <= step / 2 * (1 + 1e-5)).all() and err.max() > 0
    assert quantised["embed"]["embedding"].dtype == jnp.float32  # embeddings, norms, heads: fp32


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_qlora_gradients_reach_only_adapters_and_match_dequantised_merge(base, quantize):
    """The trainable tree is the adapters alone; their gradients through the quantised model equal
    those through the plain model on dequant(W) + (alpha/r)·A·B."""
    model, params = base
    spec = spec_of(quantize)
    lmodel = lora.lora_model(model, spec)
    frozen = lora.quantize_base(lmodel, lora.split(params, spec)[1])
    adapters = jax.jit(lambda f: lora.init_adapters(lmodel, f, jax.random.PRNGKey(1)))(frozen)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
    trainable, frozen2 = lora.split(lora.combine(adapters, frozen), spec)
    assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0])
    assert lora.count(frozen2) == lora.count(params)
    assert_adapter_gradients_are_the_merged_models(model, lmodel, trainable, frozen2, spec)


def test_adapter_free_quantised_model_is_the_zero_adapter_model(base):
    """What the RL and DPO reference relies on: `base_model` on the frozen quantised tree gives
    exactly (bit for bit) the LoRA model's outputs with fresh (B = 0) adapters."""
    model, params = base
    spec = spec_of("nf4")
    lmodel = lora.lora_model(model, spec)
    frozen = lora.quantize_base(lmodel, params)
    fresh = jax.jit(lambda f: lora.init_adapters(lmodel, f, jax.random.PRNGKey(3)))(frozen)
    np.testing.assert_array_equal(logprobs(lmodel, lora.combine(fresh, frozen)),
                                  logprobs(lora.base_model(model, spec), frozen))


def test_frozen_bytes_per_device_shrink_by_the_stored_width(base):
    """int8 codes are 1 byte per weight plus one fp32 scale per 16 weights; everything else stays fp32
    (on XLA:CPU a uint4 code also occupies one byte: nf4 and int8 hold the same bytes here)."""
    model, params = base
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    spec = spec_of("int8")
    lmodel = lora.lora_model(model, spec)
    frozen_sh = lora.split(sharding.param_shardings(lmodel, mesh), spec)[1]
    frozen = jax.jit(lambda p: lora.quantize_base(lmodel, p), out_shardings=frozen_sh)(params)
    kernels = sum(params["layers"][g][p]["kernel"].size for g, ps in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                  for p in ps)
    expected = 4 * lora.count(params) - 3 * kernels + 4 * kernels // 16
    assert lora_state.per_device_bytes(frozen) == expected < 4 * lora.count(params)


@pytest.mark.parametrize("axes", [("fsdp", None), (None, "tensor"), (None, None)])
def test_nf4_dequantisation_is_qwix_bit_for_bit_and_keeps_the_kernel_sharding(axes):
    """`lora.dequantize_qarray` = `qwix.dequantize` exactly (fp32 and bf16 scales), and a kernel
    sharded over fsdp or tensor dequantises to the same sharding (qwix's 1-D NF4 lookup made XLA
    gather the whole kernel: experiments/plan_memory.py's QLoRA temporaries)."""
    kernel = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 64), jnp.float32) * 0.02
    q = jax.vmap(lambda w: lora.qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}))(kernel)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(lora.dequantize_qarray(q.astype(dtype)), lora.qwix.dequantize(q.astype(dtype)))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    spec = jax.sharding.PartitionSpec(None, *axes)
    q_sh = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, spec), q)
    compiled = jax.jit(lora.dequantize_qarray, in_shardings=(q_sh,)).lower(q).compile()
    assert compiled.output_shardings.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), 3)
    assert "all-gather" not in compiled.as_text()


def test_bad_quantisation_config_names_the_key(base):
    cfg = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, target_modules=".*", modules_to_save="",
                                         quantize="int4", quantize_block=64))
    with pytest.raises(ValueError, match=r"^config.lora.quantize='int4' must be one of none, int8, nf4"):
        lora.LoraSpec.from_config(cfg)
    cfg.quantize = "nf4"
    spec = lora.LoraSpec.from_config(cfg)
    with pytest.raises(ValueError, match=r"^config.lora.quantize_block=64 does not divide the projection input size"):
        lora.lora_model(base[0], spec)
    # A rank equal to a projection size (d_model 16 here): qwix would take an adapter for the kernel.
    cfg.update(quantize_block=16, rank=16)
    with pytest.raises(ValueError, match=r"^config.lora.rank=16 with config.lora.quantize='nf4': the rank equals a "
                                         r"projection size of the model \(8, 16, 32\)"):
        lora.lora_model(base[0], lora.LoraSpec.from_config(cfg))
    cfg.rank = 12
    lora.lora_model(base[0], lora.LoraSpec.from_config(cfg))  # any other rank builds
    # quantize without LoRA would be a silent fp32 fine-tune; the section's key is in the message
    cfg.rank = 0
    with pytest.raises(ValueError, match=r"^config.actor.lora.quantize='nf4' needs config.actor.lora.rank > 0"):
        lora.LoraSpec.from_config(cfg, "config.actor.lora")
