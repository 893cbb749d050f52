"""The RL actor with config.actor.lora: the state holds adapters and one base copy (the reference),
the reference log-probs of the adapter-free actor are exactly a separate reference model's, the
actor's log-probs are the merged model's, and whole iterations train the adapters only. The same
with QLoRA (config.actor.lora.quantize): the reference is the quantised adapter-free actor, within
the stated nf4 tolerance of the fp32 base; a QLoRA critic over the RM; exact resume of both."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo as ppo_configs
from rlhf_jax import algorithms, loading, losses, lora, sharding
from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax.algorithms.rollout import policy_forward
from rlhf_jax.models import Transformer, init_params
from rlhf_jax.trainers import ppo, setup

pytestmark = pytest.mark.usefixtures("compilation_cache")
# Max |log-prob - fp32 log-prob| of an nf4 base (test_qlora.py's bound for its model, block 16).
NF4_TOLERANCE = 3e-2


def lora_ppo_config(**overrides):
    config = ppo_configs.get_config("tiny")
    config.update(fast_compile=True)
    config.actor.lora.update(rank=4, alpha=8.0, quantize_block=16)
    config.critic.lora.quantize_block = 16
    config.actor.optim.decay_steps = 1000
    config.critic.optim.decay_steps = 1000
    config.update_from_flattened_dict(overrides)
    return config


def build(config):
    mesh = sharding.make_mesh(config.mesh)
    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False)
    return mesh, models, optimizers, state_sh, ppo.initial_state(config, models, optimizers, state_sh)


@pytest.fixture(scope="module", params=["none", "nf4"])
def built(request):
    config = lora_ppo_config(**{"actor.lora.quantize": request.param})
    return (config, *build(config))


def test_state_holds_adapters_and_one_base_copy(built):
    _, _, models, _, _, state = built
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state.actor)[0]]
    assert paths and all(lora.is_adapter(p) for p in paths)
    moments = [x for x in jax.tree.leaves(state.actor_opt) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 2 * lora.count(state.actor)
    base = Transformer(models.actor.config)
    assert lora.count(state.ref) == lora.count(jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0),
                                                                                 jnp.zeros((1, 4), jnp.int32))))
    # The (full) critic starts from the actor's starting weights as the actor sees them: a QLoRA
    # actor's base dequantised.
    kernel = state.ref["layers"]["mlp"]["up"]["kernel"]
    np.testing.assert_array_equal(state.critic["layers"]["mlp"]["up"]["kernel"], lora.dequantize(kernel))


def test_reference_is_exactly_the_adapter_free_actor(built):
    """Rollout with trained-looking adapters: ref_logprobs == a separate reference model with its own
    copy of the base weights (bit-equal; QLoRA: the adapter-free model on the quantised base, its
    kernels stored as 4-bit codes, within NF4_TOLERANCE of the fp32 base it was made from);
    logprobs == the merged-weights model's."""
    config, mesh, models, _, _, state = built
    noisy = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(3), x.shape), state.actor)
    state = state.replace(actor=noisy)
    settings = ppo.settings_from_config(config)
    prompts = next(ppo.iteration_batches(*ppo.make_data(config, "unused", group_size=1), group_size=1))["prompts"]
    prompts = {k: jnp.asarray(prompts[k]) for k in ("prompt_ids", "prompt_mask")}
    experience, _ = jax.jit(lambda s, p: algorithms.rollout(models, settings, s, p, jax.random.PRNGKey(0)))(
        state, prompts)
    prompt_len = prompts["prompt_ids"].shape[1]
    temperature = settings.temperature

    def logprobs_of(model, params):
        def fn(p):
            logits, _ = policy_forward(model, p, experience.seq_ids, experience.seq_mask, prompt_len, temperature)
            return losses.token_logprobs(logits, experience.tokens)
        return jnp.where(experience.mask > 0, jax.jit(fn)(params), 0.0)

    plain = Transformer(models.actor.config)
    own_copy = jax.device_get(state.ref)
    np.testing.assert_array_equal(experience.ref_logprobs, logprobs_of(lora.base_model(plain, models.actor_lora),
                                                                       own_copy))
    merged = lora.merge(lora.combine(jax.device_get(noisy), own_copy), models.actor_lora)
    np.testing.assert_allclose(experience.logprobs, logprobs_of(plain, merged), atol=1e-4)
    assert float(jnp.abs(experience.logprobs - experience.ref_logprobs).max()) > 1e-3
    assert float(jnp.sum(experience.mask)) > 0
    if models.actor_lora.quantized:  # the fp32 weights the quantised base was made from (initial_state's rng)
        init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)[0]
        fp32 = jax.jit(lambda r: init_params(plain, r))(init_rng)
        assert state.ref["layers"]["mlp"]["up"]["kernel"].array.qvalue.dtype == jnp.uint4
        gap = float(jnp.abs(experience.ref_logprobs - logprobs_of(plain, fp32)).max())
        assert 0 < gap < NF4_TOLERANCE


def test_iterations_train_the_adapters_and_leave_the_reference(built):
    config, mesh, models, optimizers, state_sh, state = built
    before = jax.device_get(state)
    step = ppo.jit_iteration(models, ppo.settings_from_config(config), optimizers, state_sh, mesh, with_ptx=False,
                             options=setup.compiler_options(config))
    batches = ppo.iteration_batches(*ppo.make_data(config, "unused", group_size=1), group_size=1)
    kls = []
    for _ in range(2):
        state, metrics, _ = step(state, ppo.place_batch(next(batches), mesh))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite_updates"]) == 0
        kls.append(float(metrics["kl"]))
    assert kls[0] == 0.0 and kls[1] != 0.0  # fresh adapters (B = 0): the actor is exactly its reference
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.ref, before.ref)
    changed = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after.actor), jax.tree.leaves(before.actor))]
    assert min(changed) > 0


def test_lora_actor_needs_the_actor_as_reference(tmp_path):
    config = lora_ppo_config(**{"reference.init.source": "hf", "reference.init.path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"^config.actor.lora.rank=4 needs config.reference.init.source='actor'"):
        ppo.train(config, str(tmp_path / "run"))


def test_sigterm_then_rerun_resumes_exactly_without_the_base_in_the_checkpoint(tmp_path, sigterm_after_step):
    """The checkpoint holds the actor's and the critic's adapters and the optimizer state, not the
    frozen base (re-read from the actor's init on resume); a run stopped after iteration 2 ends where
    the straight run ends."""
    config = lora_ppo_config(**{"num_steps": 4, "checkpoint.save_every": 2, "log_every": 1,
                                "critic.lora.rank": 4, "critic.lora.alpha": 8.0})  # the critic's adapters too
    straight, _ = assert_resume_is_exact(config, tmp_path, sigterm_after_step)
    assert ppo.state_items(straight.state, with_ref=False)["train"].ref is None


def assert_resume_is_exact(config, tmp_path, sigterm_after_step):
    """Runs `config` (4 iterations, a checkpoint every 2) straight, and again stopped by SIGTERM after
    iteration 2 and re-run: the metric rows and the final state must be equal. (straight result, rows)."""
    from rlhf_jax import metrics

    straight = ppo.train(config, str(tmp_path / "straight"))
    sigterm_after_step(1)
    first = ppo.train(config, str(tmp_path / "resumed"))
    assert first.preempted and first.step == 2
    second = ppo.train(config, str(tmp_path / "resumed"))
    assert second.step == 4
    keys = ("loss", "policy/loss", "value/loss", "reward/mean", "kl", "entropy", "lr")
    rows = [{k: r[k] for k in keys} for r in metrics.read_metrics(tmp_path / "resumed")]
    assert rows == [{k: r[k] for k in keys} for r in metrics.read_metrics(tmp_path / "straight")]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state), jax.device_get(straight.state))
    return straight, rows


# ---- a LoRA critic (config.critic.lora) --------------------------------------------------------
def test_lora_critic_trains_adapters_and_value_head_over_the_actor_base():
    """critic.lora with critic.init 'actor': the state's critic is its adapters + value head (moments
    for those only), its values are the merged critic's, and iterations move adapters and head while
    the shared base (the reference) stays bit-equal."""
    config = lora_ppo_config(**{"critic.lora.rank": 4, "critic.lora.alpha": 8.0})
    mesh, models, optimizers, state_sh, state = build(config)
    assert set(state.critic) == {"layers", "value_head"}
    assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.critic["layers"])[0])
    moments = [x for x in jax.tree.leaves(state.critic_opt) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 2 * lora.count(state.critic)

    settings = ppo.settings_from_config(config)
    step = ppo.jit_iteration(models, settings, optimizers, state_sh, mesh, with_ptx=False,
                             options=setup.compiler_options(config))
    batches = ppo.iteration_batches(*ppo.make_data(config, "unused", group_size=1), group_size=1)
    before = jax.device_get(state)
    for _ in range(2):
        state, metrics, _ = step(state, ppo.place_batch(next(batches), mesh))
        assert np.isfinite(float(metrics["value/loss"]))
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.ref, before.ref)
    changed = [float(np.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(after.critic), jax.tree.leaves(before.critic))]
    assert min(changed) > 0

    # Independent expectation of the values: the plain value model on the merged weights.
    prompts = next(batches)["prompts"]
    prompts = {k: jnp.asarray(prompts[k]) for k in ("prompt_ids", "prompt_mask")}
    experience, _ = jax.jit(lambda s, p: algorithms.rollout(models, settings, s, p, jax.random.PRNGKey(0)))(
        state, prompts)
    prompt_len = prompts["prompt_ids"].shape[1]
    merged = lora.merge(lora.combine(after.critic, after.ref), models.critic_lora)
    plain = Transformer(models.critic.config, heads=("value",))
    expected = jax.jit(lambda p: plain.apply({"params": p}, experience.seq_ids, experience.seq_mask,
                                             heads_from=prompt_len - 1).values[:, :-1])(
        {k: v for k, v in merged.items() if k != "lm_head"})
    valid = np.asarray(experience.mask) > 0
    np.testing.assert_allclose(np.asarray(experience.values)[valid], np.asarray(expected)[valid], atol=1e-5)


def test_lora_critic_config_errors_name_the_key(tmp_path):
    config = lora_ppo_config(**{"critic.lora.rank": 4, "critic.type": "shared"})
    with pytest.raises(ValueError, match=r"^config.critic.lora.rank=4 with config.critic.type='shared'"):
        ppo.train(config, str(tmp_path / "a"))
    config = lora_ppo_config(**{"actor.lora.quantize": "nf4", "critic.lora.rank": 4, "critic.lora.alpha": 8.0})
    with pytest.raises(ValueError, match=r"^config.critic.lora.quantize='none' with config.critic.init.source='actor': "
                                         r"the critic reads the actor's frozen base in place"):
        ppo.train(config, str(tmp_path / "b"))
    config = lora_ppo_config(**{"actor.lora.quantize": "nf4", "critic.lora.rank": 4, "critic.lora.quantize": "nf4",
                                "critic.lora.quantize_block": 32})
    with pytest.raises(ValueError, match=r"^config.critic.lora.quantize_block=32 with config.critic.init.source="
                                         r"'actor': .* set critic.lora.quantize_block=16 \(the actor's\)$"):
        ppo.train(config, str(tmp_path / "c"))
    config = lora_ppo_config(**{"actor.lora.quantize": "nf4", "actor.lora.quantize_block": 24})
    with pytest.raises(ValueError, match=r"^config.actor.lora.quantize_block=24 does not divide"):
        ppo.train(config, str(tmp_path / "d"))


def test_a_lora_actor_on_a_scratch_base_warns_that_it_cannot_be_reloaded(tmp_path, capsys):
    ppo.train(lora_ppo_config(num_steps=1), str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert "WARNING config.actor.lora.rank=4 on a freshly initialised actor (config.actor.init.source='scratch'): " \
           "that base is never saved" in err


# ---- QLoRA critic over the RM; exact resume with both bases quantised -------------------------
def save_reward_model(workdir, config) -> dict:
    """A random RM checkpoint of the tiny actor's shape (what experiments/train_rm.py writes); its params."""
    model = Transformer(ppo.build_models(config).actor.config, heads=("value",))
    params = jax.device_get(jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(12)))
    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    checkpointer.save(1, {"params": params}, {"model": loading.model_meta(model), "stage": "rm",
                                              "reward_norm": {"mean": 0.1, "std": 2.0}})
    checkpointer.close()
    return params


def test_qlora_actor_and_critic_resume_exactly_with_neither_base_in_the_checkpoint(tmp_path, sigterm_after_step):
    """nf4 actor (the reference reads its quantised base) and an nf4 LoRA critic over the RM (the RM
    scores through the same quantised base, one copy): the frozen RM is the quantised RM checkpoint,
    neither base is in the checkpoint (both re-read and re-quantised on resume), and a run stopped
    after iteration 2 ends bit-equal to the straight run."""
    rm_params = save_reward_model(tmp_path / "rm", lora_ppo_config())
    config = lora_ppo_config(**{"num_steps": 4, "checkpoint.save_every": 2, "log_every": 1,
                                "actor.lora.quantize": "nf4", "critic.lora.rank": 4, "critic.lora.alpha": 8.0,
                                "critic.lora.quantize": "nf4", "critic.init.source": "reward",
                                "reward.init.source": "checkpoint", "reward.init.path": str(tmp_path / "rm"),
                                "rewards.rm_weight": 1.0})
    straight, rows = assert_resume_is_exact(config, tmp_path, sigterm_after_step)
    assert rows[0]["kl"] == 0.0 and all(np.isfinite(r["value/loss"]) for r in rows)
    expected_reward = jax.jit(lambda p: lora.quantize_base(straight.models.critic, p))(rm_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.reward), jax.device_get(expected_reward))
    assert straight.state.reward["layers"]["attn"]["q"]["kernel"].array.qvalue.dtype == jnp.uint4
    items = ppo.state_items(straight.state, with_ref=False, with_reward=False)["train"]
    assert items.ref is None and items.reward is None
