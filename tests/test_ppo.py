"""PPO trainer: rule rewards, learning on a trivially learnable reward, 1 vs 8 devices, exact resume
after SIGTERM, the 8-device checkpoint continued by the script on 1 device, NaN stop, KL blow-up
flag, and a 2-process jax.distributed CPU run (opt-in).

Compilation dominates on CPU, so every test uses the same tiny config with `fast_compile` and the
session's persistent compilation cache (tests/conftest.py): a program already compiled by one test
(or subprocess) is loaded, not recompiled, by the next.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo as ppo_configs
from rlhf_jax import algorithms, loading, optim, rewards, sharding, tasks
from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.data import synthetic
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.trainers import loop, ppo, setup

from conftest import multiprocess_test

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_ppo.py"
DETERMINISTIC_KEYS = ("loss", "policy/loss", "value/loss", "reward/mean", "reward/std", "kl", "entropy",
                      "policy/clipfrac", "policy/approx_kl", "value/explained_variance", "response/length",
                      "kl_coef", "lr")
pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(**overrides):
    """The tiny preset, emit-token-3 reward; decay_steps fixed so num_steps does not change the program,
    fast_compile (XLA backend optimisation off) because compiling dominates these short runs."""
    config = ppo_configs.get_config("tiny")
    config.fast_compile = True
    config.actor.optim.decay_steps = 1000
    config.critic.optim.decay_steps = 1000
    config.checkpoint.save_every = 2
    config.update_from_flattened_dict(overrides)  # dotted keys: 'a.b.c'
    return config


def run_iterations(config, mesh, n, observe=None):
    """`n` RL iterations through the public pieces of the trainer -> (metrics rows, state, jitted step).

    Synthetic prompts (and counting-sequence ptx batches when ptx.coef > 0), as `train` uses them.
    `observe(before, after, row)` sees host copies of the state around each iteration.
    """
    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=config.ema_decay > 0,
                                          penalty=ppo.penalty_coef(config) is not None)
    state = ppo.initial_state(config, models, optimizers, state_sh)
    step_fn = ppo.jit_iteration(models, ppo.settings_from_config(config), optimizers, state_sh, mesh,
                                with_ptx=bool(config.ptx.coef), options=setup.compiler_options(config))
    group_size = ppo.group_size(config)
    batches = ppo.iteration_batches(*ppo.make_data(config, "unused-without-data-files", group_size=group_size),
                                    group_size=group_size)
    rows = []
    for _ in range(n):
        batch = ppo.place_batch(next(batches), mesh)
        before = jax.device_get(state) if observe else None
        state, metrics, _ = step_fn(state, batch)
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        if observe:
            observe(before, jax.device_get(state), rows[-1])
    return rows, state, step_fn


def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


# ----------------------------------------------------------------------------------------------
# Rule-based rewards (pure)
# ----------------------------------------------------------------------------------------------
def test_rule_rewards_by_hand():
    tokens = jnp.array([[3, 3, 5, 1, 0], [4, 3, 2, 2, 2]])  # row 0 ends with EOS (1); row 1 never does
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rewards.target_token_count(tokens, mask, token=3), [2.0, 1.0])
    np.testing.assert_array_equal(rewards.length_deviation(tokens, mask, target=3), [-1.0, -2.0])  # |4-3|, |5-3|
    np.testing.assert_array_equal(rewards.missing_eos(tokens, mask, stop_ids=(1,)), [0.0, -1.0])
    np.testing.assert_array_equal(rewards.missing_eos(tokens, mask, stop_ids=(1, 2)), [0.0, 0.0])  # row 1 stops at 2
    rule = rewards.make_rule_reward({"target_token": {"weight": 2.0, "token": 3},
                                     "length": {"weight": 0.5, "target": 3},
                                     "missing_eos": {"weight": 0.0}}, stop_ids=(1,))
    total, parts = rule(tokens, mask)
    np.testing.assert_allclose(total, [2 * 2 - 0.5 * 1, 2 * 1 - 0.5 * 2])  # missing_eos is off (weight 0)
    assert sorted(parts) == ["length", "target_token"]
    rule = rewards.make_rule_reward({"missing_eos": {"weight": 3.0}}, stop_ids=(1,))  # the rollout's stop set
    np.testing.assert_allclose(rule(tokens, mask)[0], [0.0, -3.0])
    with pytest.raises(ValueError, match=r"missing_eos: .*the stop set is config.rollout.eos_id"):
        rewards.active_rules({"missing_eos": {"weight": 1.0, "eos_id": 1}})
    # a masked-out 3 after EOS does not count
    np.testing.assert_array_equal(rewards.target_token_count(jnp.array([[1, 3]]), jnp.array([[1, 0]]), token=3), [0.0])


def test_rule_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.rewards.rules.bogus: unknown rule"):
        rewards.active_rules({"bogus": {"weight": 1.0}})
    with pytest.raises(ValueError, match=r"config.rewards.rules.length: has keys \['weight'\]"):
        rewards.active_rules({"length": {"weight": 1.0}})


def test_config_errors_before_compilation():
    with pytest.raises(ValueError, match=r"config.critic.type='bogus'"):
        ppo.validate_config(tiny_config(**{"critic.type": "bogus"}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.rollout.batch_size=12 must be a positive multiple of "
                                         r"data\*fsdp=8 \* ppo.num_minibatches=2 = 16"):
        ppo.validate_config(tiny_config(**{"rollout.batch_size": 12}), (8, 1, 1))
    with pytest.raises(ValueError, match=r"config.rewards.rm_weight=1.0 but config.reward.init.source='none'"):
        ppo.validate_config(tiny_config(**{"rewards.rm_weight": 1.0}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.reward.init.path='/nonexistent/rm' does not exist"):
        ppo.validate_config(tiny_config(**{"reward.init.source": "checkpoint", "reward.init.path": "/nonexistent/rm"}),
                            (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.reference.init.source='scratch' \(allowed: 'actor', 'checkpoint', 'hf'\)"):
        ppo.validate_config(tiny_config(**{"reference.init.source": "scratch"}), (1, 1, 1))
    with pytest.raises(ValueError, match=r"config.rewards: no reward at all"):
        ppo.validate_config(tiny_config(**{"rewards.rules.target_token.weight": 0.0}), (1, 1, 1))


def test_synthetic_prompts_are_left_padded_and_process_sliced():
    full = next(synthetic.SyntheticPrompts(8, 6, 2, 16, (0, 1), seed=3))
    assert np.all(full["prompt_mask"][:, -1] == 1)  # left padding: the last slot is always real
    assert np.all(np.diff(full["prompt_mask"], axis=1) >= 0)  # 0s then 1s
    assert np.all(full["prompt_mask"].sum(1) >= 2)
    real = full["prompt_ids"][full["prompt_mask"] == 1]
    assert not np.isin(real, [0, 1]).any()  # no pad / EOS inside prompts
    halves = [next(synthetic.SyntheticPrompts(8, 6, 2, 16, (0, 1), seed=3, process_index=i, process_count=2))
              for i in range(2)]
    for key in full:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


# ----------------------------------------------------------------------------------------------
# Learning, sharding invariance
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_device_run():
    """30 iterations of the tiny config on one device (shared by the learning and sharding tests)."""
    return run_iterations(tiny_config(), one_device_mesh(), 30)


def test_reward_rises_on_emit_token_task_and_compiles_once(single_device_run):
    """Reward = number of token-3s in an 8-token response. A random 64-token policy emits ~8/62 of them;
    within 30 iterations PPO must raise the batch mean by more than 2 tokens, with KL finite."""
    rows, state, step_fn = single_device_run
    rewards_curve = np.array([r["reward/mean"] for r in rows])
    first, last = rewards_curve[:5].mean(), rewards_curve[-5:].mean()
    assert first < 1.0, first
    assert last > first + 2.0, rewards_curve
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["kl"] > 0.1  # the policy moved away from the reference ...
    assert rows[-1]["nonfinite_steps"] == 0
    assert int(state.step) == 30
    assert step_fn._cache_size() == 1  # 30 iterations, one trace / compile


# Shared value head, PPO-ptx on counting sequences, EMA and the adaptive KL controller.
VARIANT = dict(ema_decay=0.9, **{"critic.type": "shared", "ptx.coef": 1.0, "kl.adaptive": True, "kl.target": 1.0,
                                                  "kl.horizon": 100})


@pytest.fixture(scope="module")
def variant_single_run():
    """6 iterations of the VARIANT config on one device, keeping (before, after) state pairs."""
    pairs = []
    rows, _, _ = run_iterations(tiny_config(**VARIANT), one_device_mesh(), 6,
                                observe=lambda before, after, row: pairs.append((before, after)))
    return rows, pairs


def test_shared_critic_with_ptx_ema_and_adaptive_kl(variant_single_run):
    """Each mechanism checked against its formula after real iterations."""
    models = ppo.build_models(tiny_config(**VARIANT))
    assert models.actor.heads == ("lm", "value") and models.critic is None
    rows, pairs = variant_single_run
    for row, (before, after) in zip(rows, pairs):
        # EMA: e_t = 0.9 e_{t-1} + 0.1 θ_t   (e_0 = θ_0)
        jax.tree.map(lambda e, e0, a: np.testing.assert_allclose(e, 0.9 * e0 + 0.1 * a, rtol=1e-5, atol=1e-7),
                     after.ema, before.ema, after.actor)
        # Ziegler et al.: β_{t+1} = β_t (1 + clip(KL/target − 1, ±0.2) · B / horizon), B = 16, target 1, horizon 100
        expected = before.kl_coef * (1 + np.clip(row["kl"] / 1.0 - 1, -0.2, 0.2) * 16 / 100)
        np.testing.assert_allclose(after.kl_coef, expected, rtol=1e-5)
        assert row["kl_coef"] == pytest.approx(float(before.kl_coef), rel=1e-6)  # logged: the β used
        jax.tree.map(np.testing.assert_array_equal, after.ref, before.ref)  # the reference is frozen
        assert math.isfinite(row["value/loss"]) and math.isfinite(row["loss"])
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]
    # The LM term is really trained: counting sequences get likelier (random init: ~ln 64 = 4.16 nats).
    assert 3.5 < rows[0]["ptx/loss"] < 4.6
    assert rows[-1]["ptx/loss"] < rows[0]["ptx/loss"] - 0.3, [r["ptx/loss"] for r in rows]


def test_one_vs_eight_devices_same_first_iterations(variant_single_run):
    """data=2, fsdp=2, tensor=2 against one device, on the VARIANT config (its ptx batch, EMA and value
    head are sharded too). data=8 is checked against one device in the script/resume test."""
    sharded, state, _ = run_iterations(tiny_config(**VARIANT), sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 2)
    assert len(state.actor["layers"]["attn"]["q"]["kernel"].sharding.device_set) == 8
    assert_same_metrics(variant_single_run[0][:2], sharded, DETERMINISTIC_KEYS + ("ptx/loss",))


def assert_same_metrics(reference_rows, rows, keys=DETERMINISTIC_KEYS):
    assert len(reference_rows) == len(rows)
    for one, many in zip(reference_rows, rows):
        for key in keys:
            np.testing.assert_allclose(many[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _save_stage(workdir, model, params, meta):
    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    checkpointer.save(1, {"params": params}, {"model": loading.model_meta(model), **meta})
    checkpointer.close()


def test_hand_off_from_sft_and_rm_checkpoints(tmp_path):
    """Actor/reference from an SFT checkpoint, reward model and critic from an RM checkpoint (with its
    stored normalisation), prompts and ptx text from files through rlhf_jax.data and the task's
    tokenizer; sequence-level critic. Frozen roles stay bit-identical; scores follow the RM formula."""
    files = tasks.export_task(tmp_path / "task", n_sft=2, n_rm_prompts=2, n_ppo_prompts=40, n_heldout=2, n_corpus=40)
    arch = TransformerConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64)
    sft_model, rm_model = Transformer(arch, heads=("lm",)), Transformer(arch, heads=("value",))
    sft_params = jax.device_get(jax.jit(lambda r: init_params(sft_model, r))(jax.random.PRNGKey(11)))
    rm_params = jax.device_get(jax.jit(lambda r: init_params(rm_model, r))(jax.random.PRNGKey(12)))
    _save_stage(tmp_path / "sft", sft_model, sft_params, {"tokenizer": files["tokenizer"]})
    _save_stage(tmp_path / "rm", rm_model, rm_params, {"reward_norm": {"mean": 0.3, "std": 2.0}})

    config = tiny_config(**{
                             "actor.init.source": "checkpoint", "actor.init.path": str(tmp_path / "sft"),
                             "reward.init.source": "checkpoint", "reward.init.path": str(tmp_path / "rm"),
                             "critic.type": "sequence", "critic.init.source": "reward",
                             "rewards.rm_weight": 1.0, "rewards.rules.target_token.weight": 0.0,
                             "rollout.prompt_len": 16, "data.prompts": files["ppo_prompts"],
                             "data.ptx": files["corpus"], "data.cache_dir": str(tmp_path / "tfds"),
                             "ptx.coef": 0.5})
    mesh = one_device_mesh()
    ppo.validate_config(config, (1, 1, 1))
    # each checkpoint's kind is checked against its role, naming the key the user set
    wrong = config.copy_and_resolve_references()
    wrong.reward.init.path = str(tmp_path / "sft")
    with pytest.raises(ValueError, match=r"config.reward.init.path='.*/sft' holds a model with heads \('lm',\), "
                                         r"not a reward model"):
        ppo.build_models(wrong)
    wrong = config.copy_and_resolve_references()
    wrong.actor.init.path = str(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"config.actor.init.path='.*/rm' holds a model with heads \('value',\), "
                                         r"not a language model"):
        ppo.build_models(wrong)
    models = ppo.build_models(config)
    assert models.actor.config == arch and models.critic.config == arch and models.critic.heads == ("value",)
    tokenizer = ppo.load_tokenizer(config, models)
    prompts, ptx = ppo.make_data(config, str(tmp_path / "run"), tokenizer)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False)
    state = ppo.initial_state(config, models, optimizers, state_sh)
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), b)  # noqa: E731
    same(state.actor, sft_params), same(state.ref, sft_params), same(state.reward, rm_params)
    same(state.critic, rm_params)  # critic = copy of the RM (DeepSpeed-Chat)

    settings = ppo.settings_from_config(config, loading.reward_norm(config.reward.init.path))
    assert settings.reward_norm == (0.3, 2.0)
    step_fn = ppo.jit_iteration(models, settings, optimizers, state_sh, mesh, with_ptx=True,
                                options=setup.compiler_options(config))
    batches = ppo.iteration_batches(prompts, ptx)
    for _ in range(2):
        host_batch = next(batches)
        host_prompts = host_batch["prompts"]
        assert host_prompts["prompt_ids"].shape == (16, 16) and np.all(host_prompts["prompt_mask"][:, -1] == 1)
        state, metrics, outputs = step_fn(state, ppo.place_batch(host_batch, mesh))
    same(state.ref, sft_params), same(state.reward, rm_params)  # frozen
    assert not np.allclose(jax.device_get(state.actor)["embed"]["embedding"], sft_params["embed"]["embedding"])

    # score = (raw RM value at the last real token of prompt+response − 0.3) / 2.0, recomputed here
    tokens, mask = np.asarray(outputs["tokens"]), np.asarray(outputs["mask"])
    seq = np.concatenate([host_prompts["prompt_ids"], tokens], 1)
    seq_mask = np.concatenate([host_prompts["prompt_mask"], mask], 1)
    values = np.asarray(jax.jit(lambda p, i, m: rm_model.apply({"params": p}, i, m).values)(rm_params, seq, seq_mask))
    last = [max(np.flatnonzero(row)) for row in seq_mask]
    raw = np.array([values[b, t] for b, t in enumerate(last)])
    np.testing.assert_allclose(outputs["scores"], (raw - 0.3) / 2.0, rtol=1e-4, atol=1e-5)
    assert float(metrics["reward/rm"]) == pytest.approx(float(np.mean((raw - 0.3) / 2.0)), rel=1e-4, abs=1e-5)
    assert math.isfinite(float(metrics["ptx/loss"])) and math.isfinite(float(metrics["value/loss"]))

    # the host-side gold hook sees the sampled tokens and the prompt-file rows
    seen = {}

    def gold_scorer(index, toks, msk):
        seen.update(index=index, tokens=toks)
        return msk.sum(1).astype(float)

    assert ppo.gold_mean(gold_scorer, host_prompts["index"], outputs) == pytest.approx(mask.sum(1).mean())
    np.testing.assert_array_equal(seen["tokens"], tokens)
    np.testing.assert_array_equal(seen["index"], host_prompts["index"])


def test_guarded_update_skips_non_finite_gradients():
    import optax

    params = {"w": jnp.array([1.0, 2.0])}
    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(params)
    kept, kept_state, finite = optim.guarded_update(optimizer, params, opt_state, {"w": jnp.array([jnp.nan, 1.0])},
                                                   jnp.float32(1.0))
    assert not bool(finite)
    np.testing.assert_array_equal(kept["w"], params["w"])
    jax.tree.map(np.testing.assert_array_equal, kept_state, opt_state)
    _, _, finite = optim.guarded_update(optimizer, params, opt_state, {"w": jnp.ones(2)}, jnp.float32(jnp.inf))
    assert not bool(finite)  # a non-finite loss also skips
    moved, _, finite = optim.guarded_update(optimizer, params, opt_state, {"w": jnp.ones(2)}, jnp.float32(1.0))
    assert bool(finite)
    np.testing.assert_allclose(moved["w"], [0.9, 1.9], rtol=1e-5)  # Adam's first step: −lr · sign(g)


def test_minibatch_indices_are_a_permutation_per_epoch():
    rows = np.asarray(algorithms.minibatch_indices(jax.random.PRNGKey(0), batch_size=12, epochs=3, num_minibatches=4))
    assert rows.shape == (12, 3)  # 3 epochs x 4 minibatches, 3 rows each
    epochs = rows.reshape(3, 12)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


# ----------------------------------------------------------------------------------------------
# Preemption, resume on another device count, the script, NaN stop, KL blow-up
# ----------------------------------------------------------------------------------------------
def run_script(workdir, env, *flags, timeout=300):
    cmd = [sys.executable, str(SCRIPT), f"--workdir={workdir}", "--config.fast_compile=True",
           "--config.actor.optim.decay_steps=1000",
           "--config.critic.optim.decay_steps=1000", "--config.checkpoint.save_every=2", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def comparable(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_sigterm_resume_is_exact_and_the_script_continues_the_run(single_device_run, tmp_path,
                                                                   sigterm_after_step, script_env):
    """8 devices (mesh data=8), in-process: SIGTERM while step 1 is logged -> step 2 is finished,
    checkpointed, `preempted`; the same call again equals an uninterrupted 4-step run exactly
    (metrics without timings, whole state). The uninterrupted run uses profile mode (rollout and
    update jitted apart): same numbers as the fused iteration, plus phase timings, and the same
    metrics as one device. Then the script continues a copy of the step-2 run dir to step 4 and
    logs what the in-process run logged. (Resuming onto another device count with a real trainer
    is tested in test_sft.py (1 -> 8) and test_rm.py (8 -> 1); the script runs on 8 devices here
    so that it loads the in-process program from the compilation cache.)"""
    split_dir, copy_dir, full_dir = tmp_path / "split", tmp_path / "copy", tmp_path / "full"
    sigterm_after_step(1)
    first = ppo.train(tiny_config(num_steps=4), str(split_dir))
    assert first.preempted and first.step == 2
    assert checkpoint_lib.Checkpointer(split_dir / "checkpoints").all_steps() == [2]
    shutil.copytree(split_dir, copy_dir)
    resumed = ppo.train(tiny_config(num_steps=4), str(split_dir))
    full = ppo.train(tiny_config(num_steps=4, profile_phases=True), str(full_dir))
    assert resumed.step == full.step == 4 and not resumed.preempted
    full_rows = metrics_lib.read_metrics(full_dir)
    assert all(r["time/rollout"] > 0 and r["time/update"] > 0 for r in full_rows)
    assert comparable(metrics_lib.read_metrics(split_dir)) == comparable(full_rows)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), jax.device_get(full.state))
    assert_same_metrics(single_device_run[0][:4], full_rows)  # data=8 vs 1 device

    proc = run_script(copy_dir, script_env(8), "--config.num_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PPO finished at step 4" in proc.stdout
    assert json.loads((copy_dir / "config.json").read_text())["num_steps"] == 4
    rows = metrics_lib.read_metrics(copy_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert comparable(rows) == comparable(full_rows)
    assert checkpoint_lib.Checkpointer(copy_dir / "checkpoints").all_steps() == [2, 4]
    assert list((copy_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_nonfinite_iterations_stop_with_the_last_good_checkpoint(tmp_path):
    """kl.coef = NaN makes every reward, advantage and loss NaN: each update is skipped and counted;
    after max_nonfinite_streak=3 iterations the run stops, names steps 1..3 and the step-2
    checkpoint, writes no checkpoint of step 3, and step 2 still holds the untouched initial actor."""
    config = tiny_config(num_steps=6, max_nonfinite_streak=3, **{"kl.coef": float("nan")})
    workdir = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteError, match=r"3 consecutive non-finite PPO iterations \(1\.\.3\); stopping\. "
                                                    r"Last good checkpoint: .*/checkpoints/2$"):
        ppo.train(config, str(workdir))
    rows = metrics_lib.read_metrics(workdir)
    assert [(r["step"], r["nonfinite_steps"], r["nonfinite_streak"]) for r in rows] == [(1, 1, 1), (2, 2, 2),
                                                                                         (3, 3, 3)]
    assert all(r["nonfinite_updates"] == 4 for r in rows)  # epochs 2 x minibatches 2, all skipped
    assert checkpoint_lib.Checkpointer(workdir / "checkpoints").all_steps() == [2]
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    initial = ppo.initial_state(config, models, optimizers, algorithms.state_shardings(models, optimizers, mesh,
                                                                                        ema=False))
    saved = loading.load_model(str(workdir), mesh=mesh)[1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(initial.actor))


def test_kl_blowup_is_flagged_and_logged(tmp_path, caplog):
    """Step 1 samples from actor == reference (KL exactly 0); after one update KL > 0 exceeds the
    tiny threshold: kl/blowup 0 then 1, and a loud warning names the step, the KL and the key."""
    with caplog.at_level(logging.WARNING):
        ppo.train(tiny_config(num_steps=2, **{"kl.blowup_threshold": 1e-6}), str(tmp_path))
    rows = metrics_lib.read_metrics(tmp_path)
    assert rows[0]["kl"] == 0.0 and rows[0]["kl/blowup"] == 0.0
    assert rows[1]["kl"] > 1e-6 and rows[1]["kl/blowup"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if "KL BLOW-UP" in r.getMessage()]
    assert len(warnings) == 1 and "PPO step 2" in warnings[0] and "config.kl.blowup_threshold=1e-06" in warnings[0]
    assert ppo.kl_blew_up(float("nan"), 50.0) and not ppo.kl_blew_up(49.0, 50.0)


@multiprocess_test
def test_two_process_distributed_cpu_run(run_processes, tmp_path):
    """2 local processes (1 CPU device each, gloo collectives) complete 2 PPO steps on a data=2 mesh
    (the commands are the ones in experiments/train_ppo.py's docstring)."""
    workdir = tmp_path / "multi"
    run_processes(["--config.num_steps=2", "--config.fast_compile=True", "--config.actor.optim.decay_steps=1000",
                   "--config.critic.optim.decay_steps=1000"], workdir)
    rows = metrics_lib.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    assert (workdir / "checkpoints" / "2").is_dir()


def test_old_ppo_keys_fail_with_the_new_key(tmp_path):
    """README's old command lines (flat actor_checkpoint / reward_checkpoint / critic / critic_init /
    *_optim keys) stop in one line naming the key that replaced them."""
    for flag, new in (("--config.actor_checkpoint=runs/sft", "--config.actor.init.path"),
                      ("--config.critic_init=reward", "--config.critic.init.source"),
                      ("--config.critic=shared", "--config.critic.type"),
                      ("--config.actor_optim.learning_rate=0.1", "--config.actor.optim.learning_rate")):
        proc = subprocess.run([sys.executable, str(SCRIPT), f"--workdir={tmp_path / 'run'}", flag], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "was renamed: use " + new in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
