"""Mesh from config, logical-axis rules, batch placement, and the jitted sharded train step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import optim, sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.trainers import state as train_state

TINY = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)


def test_resolve_mesh_shape_fills_minus_one_and_names_the_key_on_error():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape({"data": 8, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    with pytest.raises(ValueError, match=r"config.mesh: data\*fsdp\*tensor = 2\*2\*1 = 4 but jax.device_count\(\) = 8"):
        sharding.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="config.mesh.tensor=0"):
        sharding.resolve_mesh_shape({"data": 1, "fsdp": 1, "tensor": 0}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_make_mesh_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.data_parallel_size(mesh) == 4
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_logical_rules_fall_back_to_replication():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # vocab->tensor (64 % 2 == 0), embed->fsdp.
    assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # 63 is not divisible by tensor=2: that dim is replicated, the other keeps its axis.
    assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (63, 32), mesh) == P(None, "fsdp")
    # a mesh axis is used at most once per array: the second "mlp" dim is replicated.
    assert sharding.logical_to_mesh_spec(P("mlp", "mlp"), (8, 8), mesh) == P("tensor", None)
    # unknown names and the batch rule (tuple of axes)
    assert sharding.logical_to_mesh_spec(P("unknown", "batch"), (4, 8), mesh) == P(None, ("data", "fsdp"))
    # axes of size 1 are dropped: on a pure data-parallel mesh parameters are replicated.
    dp = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (64, 32), dp) == P(None, None)


def test_param_shardings_follow_the_rules_table():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(Transformer(TINY), mesh))
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["layers"]["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor")  # (layers, embed, heads)
    assert specs["layers"]["attn"]["o"]["kernel"] == P(None, "tensor", "fsdp")  # (layers, heads, embed)
    assert specs["layers"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")  # (layers, mlp, embed)
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")  # (embed, vocab)
    assert specs["final_norm"]["scale"] == P("fsdp")
    odd = TINY.replace(vocab_size=63)
    odd_specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(Transformer(odd), mesh))
    assert odd_specs["embed"]["embedding"] == P(None, "fsdp")


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    batch = sharding.shard_batch({"input_ids": ids, "ranks": ids.reshape(8, 3, 1)}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), ids)
    shards = batch["input_ids"].addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(2, 3)}  # 8 rows / (data*fsdp=4)
    assert batch["ranks"].sharding.spec == P(("data", "fsdp"))


# ----------------------------------------------------------------------------------------------
# The jitted step: sharded == unsharded, accumulation == one big batch, NaN guard
# ----------------------------------------------------------------------------------------------
def _optim_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=2, decay_steps=0, final_lr_ratio=0.1,
                                         b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0))
    cfg.update(overrides)
    return cfg


def _lm_loss(model):
    from rlhf_jax import losses

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
        loss, aux = losses.lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"accuracy": aux["accuracy"]}
    return loss_fn


def _batch(rows=8, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, size=rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids * mask, "attention_mask": mask, "loss_mask": mask}


def _run_steps(mesh, params, steps=3, grad_accum=1):
    model = Transformer(TINY)
    optimizer, schedule = optim.make_optimizer(_optim_cfg(), num_steps=10)
    param_sh = sharding.param_shardings(model, mesh)
    state_sh = train_state.train_state_shardings(optimizer, jax.eval_shape(lambda: params), param_sh, mesh)
    state = train_state.init_train_state(params, optimizer, jax.random.PRNGKey(1), state_sh)
    weight = lambda b: jnp.sum(b["loss_mask"][:, 1:])
    step = train_state.jit_train_step(train_state.make_train_step(_lm_loss(model), optimizer, schedule,
                                                        grad_accum=grad_accum, weight_fn=weight),
                                 state_sh, sharding.batch_sharding(mesh))
    losses = []
    for i in range(steps):
        state, metrics = step(state, sharding.shard_batch(_batch(seed=i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def test_sharded_step_matches_single_device_and_accumulation_matches_big_batch():
    """1 device vs (data=2, fsdp=2, tensor=2) vs (fsdp=4, tensor=2 with 2 accumulated microbatches)."""
    init = jax.device_get(jax.jit(lambda rng: init_params(Transformer(TINY), rng))(jax.random.PRNGKey(0)))
    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    ref_losses, ref_params, ref_state = _run_steps(one_device, init)
    assert ref_losses[-1] < ref_losses[0]
    for mesh_cfg, accum in (({"data": 2, "fsdp": 2, "tensor": 2}, 1), ({"data": 1, "fsdp": 4, "tensor": 2}, 2)):
        losses, params, state = _run_steps(sharding.make_mesh(mesh_cfg), init, grad_accum=accum)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, err_msg=str((mesh_cfg, accum)))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), params, ref_params)
    # Optimizer moments live where their parameter lives.
    q_sh = state.params["layers"]["attn"]["q"]["kernel"].sharding
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"]
    assert mu.sharding.spec == q_sh.spec == P(None, "fsdp", "tensor")
    assert int(ref_state.step) == 3


def test_schedule_warmup_then_cosine():
    schedule = optim.make_schedule(_optim_cfg(), num_steps=10)
    # warmup 2 steps: 0, 0.005, then peak 0.01 at step 2; cosine to 0.1 * 0.01 at step 10.
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 10)], [0.0, 0.005, 0.01, 0.001], rtol=1e-6)
    # halfway through the decay (step 6 of 2..10): end + (peak - end) * (1 + cos(pi/2)) / 2 = 0.0055
    np.testing.assert_allclose(float(schedule(6)), 0.001 + 0.009 * 0.5, rtol=1e-6)


def test_weight_decay_only_on_matrices():
    params = jax.eval_shape(lambda: init_params(Transformer(TINY), jax.random.PRNGKey(0)))
    mask = optim.decay_mask(params)
    assert mask["layers"]["attn"]["q"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


def test_nonfinite_step_is_skipped_and_counted():
    """A batch flagged `poison` makes the loss NaN: params and optimizer state stay, counters move."""
    def loss_fn(params, batch, rng):
        loss = jnp.sum((params["w"] - 3.0) ** 2)
        return jnp.where(batch["poison"][0] > 0, jnp.nan, loss), {}

    optimizer, schedule = optim.make_optimizer(_optim_cfg(warmup_steps=0, weight_decay=0.0), num_steps=10)
    state = train_state.TrainState.create({"w": jnp.zeros(4)}, optimizer, jax.random.PRNGKey(0))
    step = jax.jit(train_state.make_train_step(loss_fn, optimizer, schedule))
    good, poison = {"poison": jnp.zeros(1, jnp.int32)}, {"poison": jnp.ones(1, jnp.int32)}
    state, m1 = step(state, good)
    after_good = jax.device_get(state)
    state, m2 = step(state, poison)
    state, m3 = step(state, poison)
    np.testing.assert_array_equal(state.params["w"], after_good.params["w"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), after_good.opt_state)
    assert (int(m2["nonfinite_steps"]), int(m3["nonfinite_steps"]), int(m3["nonfinite_streak"])) == (1, 2, 2)
    state, m4 = step(state, good)
    assert (int(m4["nonfinite_steps"]), int(m4["nonfinite_streak"]), int(state.step)) == (2, 0, 4)
    assert float(state.params["w"][0]) > float(after_good.params["w"][0]) > 0  # moving towards 3 again
