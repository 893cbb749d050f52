"""Reliability (issue 7) across the trainers: preemption guard, NaN streaks in the shared loop,
corrupted / interrupted checkpoints (unit level and through a real PPO resume), config errors
before compilation (in-process and through the scripts' flag parsing), safe loading.

The trainers' own files test their real runs: SIGTERM to the SFT script (1 device, resumed on 8),
in-process SIGTERM + exact resume for SFT / RM / PPO, an 8-device RM checkpoint continued by the
script on 1 device, NaN stops of SFT and PPO, PPO's KL blow-up flag.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import ppo as ppo_configs
from rlhf_jax import checkpoint, loading, metrics, optim, sharding, tasks
from rlhf_jax.trainers import loop, ppo, setup
from rlhf_jax.trainers import state as train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("compilation_cache")


# ----------------------------------------------------------------------------------------------
# The shared training loop on a toy problem: least squares y = x . [1, 2, 3, 4]
# ----------------------------------------------------------------------------------------------
TRUE_W = np.array([1.0, 2.0, 3.0, 4.0], np.float32)


class ToyBatches:
    """Batch s (8 rows) is a pure function of s; steps in `poison` carry a NaN target."""

    def __init__(self, poison=()):
        self.position, self.poison = 0, set(poison)

    def __next__(self):
        rng = np.random.default_rng(self.position)
        x = rng.normal(size=(8, 4)).astype(np.float32)
        y = x @ TRUE_W
        self.position += 1
        if self.position in self.poison:  # the step that consumes this batch
            y = np.full_like(y, np.nan)
        return {"x": x, "y": y}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def toy_loss(params, batch, rng):
    return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"])), {}


def toy_config(**fields):
    config = ml_collections.ConfigDict(dict(num_steps=8, log_every=1, eval_every=0, max_nonfinite_streak=3,
                                            checkpoint=dict(save_every=4)))
    config.update(fields)
    return config


def toy_run(workdir, config, batches, resume=False):
    """`loop.train_loop` on the toy problem (8-device data mesh), resuming from workdir when asked."""
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    optim_cfg = ml_collections.ConfigDict(dict(learning_rate=0.5, warmup_steps=0, decay_steps=0, final_lr_ratio=1.0,
                                               max_grad_norm=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
    optimizer, schedule = optim.make_optimizer(optim_cfg, config.num_steps)
    params = {"w": np.zeros(4, np.float32)}
    param_sh = {"w": sharding.replicated(mesh)}
    state_sh = train_state.train_state_shardings(optimizer, params, param_sh, mesh)
    init = lambda: train_state.init_train_state(params, optimizer, jax.random.PRNGKey(0), state_sh)  # noqa: E731
    checkpointer = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=5)
    state, meta, resumed = init(), {}, None
    if resume:
        shape = jax.eval_shape(lambda: train_state.TrainState.create(params, optimizer, jax.random.PRNGKey(0)))
        state, meta, resumed = train_state.restore_or_init(checkpointer, shape, state_sh, init)
        batches.set_state(meta["data"])
    step = train_state.jit_train_step(train_state.make_train_step(toy_loss, optimizer, schedule), state_sh,
                                      sharding.batch_sharding(mesh))
    writer = metrics.MetricWriter(workdir, resume_step=resumed)
    try:
        return loop.train_loop(config, state=state, step_fn=step, batches=batches,
                               place=lambda batch: sharding.shard_batch(batch, mesh), checkpointer=checkpointer,
                               writer=writer, meta_fn=lambda s: {"data": batches.get_state()},
                               items_fn=train_state.state_items)
    finally:
        writer.close()
        checkpointer.close()


def saved_params(workdir, step):
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding.replicated(
        sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})))}
    reader = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True)
    params = reader.restore({"params": target}, step=step).items["params"]
    reader.close()
    return np.asarray(params["w"])


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    """Uninterrupted 8-step toy run: metric rows and the parameters after steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("toy_ref")
    result = toy_run(workdir, toy_config(), ToyBatches())
    assert result.step == 8 and not result.preempted
    return metrics.read_metrics(workdir), saved_params(workdir, 4), np.asarray(result.state.params["w"])


def test_nan_streak_stops_naming_the_steps_and_the_intact_last_good_checkpoint(toy_reference, tmp_path):
    """Steps 5, 6, 7 see NaN targets: each is skipped and counted; at the third the loop stops
    with an error naming steps 5..7 and checkpoint 4, which still equals the clean run's step 4."""
    with pytest.raises(loop.NonFiniteError) as error:
        toy_run(tmp_path, toy_config(), ToyBatches(poison=(5, 6, 7)))
    assert str(error.value) == (f"3 consecutive non-finite steps (5..7); stopping. Last good checkpoint: "
                                f"{tmp_path.absolute()}/checkpoints/4")
    rows = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["nonfinite_steps"], r["nonfinite_streak"]) for r in rows] == [
        (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 1, 1), (6, 2, 2), (7, 3, 3)]
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [4]
    np.testing.assert_array_equal(saved_params(tmp_path, 4), toy_reference[1])


def test_isolated_nan_step_is_skipped_counted_and_the_run_goes_on(toy_reference, tmp_path):
    """One NaN step (3): skipped (the loss keeps falling afterwards), counted once, streak reset."""
    result = toy_run(tmp_path, toy_config(), ToyBatches(poison=(3,)))
    assert result.step == 8 and not result.preempted
    rows = metrics.read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [r["nonfinite_streak"] for r in rows] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert np.isnan(rows[2]["loss"]) and rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert np.all(np.isfinite(np.asarray(result.state.params["w"])))


def test_logged_lr_is_the_one_applied_after_a_skipped_step():
    """A skipped step does not advance the optimizer's schedule; the logged `lr` follows it and the
    next good step moves the parameters by exactly that learning rate."""
    schedule = lambda count: 0.1 * (count + 1)  # noqa: E731
    optimizer = optax.sgd(schedule)
    train_step = jax.jit(train_state.make_train_step(toy_loss, optimizer, schedule))
    state = train_state.TrainState.create({"w": jnp.zeros(4)}, optimizer, jax.random.PRNGKey(0))
    x = jnp.eye(4)[:2]
    good, bad = {"x": x, "y": jnp.ones(2)}, {"x": x, "y": jnp.array([1.0, np.nan])}
    logged = []
    for batch in (good, bad, good):
        before = np.asarray(state.params["w"])
        state, row = train_step(state, batch)
        logged.append(float(row["lr"]))
    np.testing.assert_allclose(logged, [0.1, 0.2, 0.2], rtol=1e-6)
    grad = jax.grad(lambda w: toy_loss({"w": w}, good, None)[0])(jnp.asarray(before))
    np.testing.assert_allclose(np.asarray(state.params["w"]), before - 0.2 * np.asarray(grad), rtol=1e-6)


def test_sigterm_in_the_shared_loop_saves_prints_and_resumes_exactly(toy_reference, tmp_path, sigterm_after_step,
                                                                      capsys):
    """SIGTERM while step 2 is logged: step 3 is finished, saved, a clear message printed; the rerun
    (restore + loop) ends with the uninterrupted run's parameters and metric rows."""
    sigterm_after_step(2)
    handler_before = signal.getsignal(signal.SIGTERM)
    first = toy_run(tmp_path, toy_config(), ToyBatches())
    assert first.preempted and first.step == 3
    out = capsys.readouterr().out
    assert (f"Preempted (SIGTERM) at step 3: checkpoint {tmp_path.absolute()}/checkpoints/3 saved; rerun the same "
            f"command to resume.") in out
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the guard put the previous handler back
    second = toy_run(tmp_path, toy_config(), ToyBatches(), resume=True)
    assert second.step == 8 and not second.preempted
    rows, _, final = toy_reference
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(metrics.read_metrics(tmp_path)) == strip(rows)
    np.testing.assert_array_equal(np.asarray(second.state.params["w"]), final)


def test_preemption_guard_first_signal_asks_second_sigint_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with loop.PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signal_name == "SIGINT" and guard.should_stop(1)
        with pytest.raises(KeyboardInterrupt):  # impatient user: the second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------------------------
# Corrupted / interrupted checkpoints
# ----------------------------------------------------------------------------------------------
def _truncate_data(step_dir):
    for chunk in (step_dir / "params").rglob("d/*"):
        chunk.write_bytes(chunk.read_bytes()[:5])


def _truncate_meta(step_dir):
    for file in (step_dir / "meta").iterdir():
        file.write_text(file.read_text()[:3])


CORRUPTIONS = {  # what breaks the newest step -> what the warning must say about it
    "truncated array data": (_truncate_data, r"Requested byte range .* is not valid"),
    "missing item": (lambda d: shutil.rmtree(d / "train"), r"Item \"train\" was not found"),
    "truncated JSON metadata": (_truncate_meta, r"JSONDecodeError"),
    "missing array manifest": (lambda d: [p.unlink() for p in (d / "params").rglob("manifest.ocdbt")],
                               r"does not exist|NOT_FOUND"),
    "emptied step directory": (lambda d: [shutil.rmtree(d), d.mkdir()], r"was not found"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_latest_step_falls_back_with_a_warning_naming_the_problem(tmp_path, caplog, name):
    corrupt, expected = CORRUPTIONS[name]
    saver = checkpoint.Checkpointer(tmp_path)
    for step in (1, 2):
        saver.save(step, {"params": {"w": jnp.full((4, 2), float(step))}, "train": {"step": jnp.int32(step)}},
                   {"step": step})
    saver.close()
    corrupt(tmp_path / "2")
    target = {"params": {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}, "train": {"step": jax.ShapeDtypeStruct(
        (), jnp.int32)}}
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.Checkpointer(tmp_path).restore(target)
    assert restored.step == 1 and restored.meta == {"step": 1}
    np.testing.assert_array_equal(restored.items["params"]["w"], np.ones((4, 2)))
    warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(warnings) == 1 and f"{tmp_path}/2 is unreadable" in warnings[0], warnings
    assert re.search(expected, warnings[0]) and "falling back to the previous step" in warnings[0]


def test_interrupted_save_is_ignored(tmp_path, caplog):
    """A save killed before its commit leaves only Orbax's temporary directory: never restored."""
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(1, {"params": {"w": jnp.ones(3)}}, {"step": 1})
    saver.close()
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 7)
    reader = checkpoint.Checkpointer(tmp_path)
    assert reader.all_steps() == [1] and reader.latest_step() == 1
    with caplog.at_level(logging.WARNING):
        restored = reader.restore({"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})
    assert restored.step == 1 and not [r for r in caplog.records if "unreadable" in r.getMessage()]
    reader.close()


def ppo_config(**overrides):
    """test_ppo's tiny config (same compiled program: the session cache serves it)."""
    config = ppo_configs.get_config("tiny")
    config.update(fast_compile=True)
    config.actor.optim.decay_steps = config.critic.optim.decay_steps = 1000
    config.checkpoint.save_every = 2
    config.update_from_flattened_dict(overrides)  # dotted keys: 'a.b.c'
    return config


def test_ppo_resume_over_a_truncated_latest_checkpoint_redoes_the_lost_steps_exactly(tmp_path, caplog):
    """A real PPO run saves steps 2 and 4; step 4's arrays are truncated. Rerunning the same command
    warns, moves step 4 aside, resumes from 2, redoes steps 3-4 and ends bit-identical."""
    workdir = tmp_path / "run"
    first = ppo.train(ppo_config(num_steps=4), str(workdir))
    rows_before = metrics.read_metrics(workdir)
    expected = jax.device_get(first.state)
    _truncate_data(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        second = ppo.train(ppo_config(num_steps=4), str(workdir))
    assert second.step == 4 and second.last_row["step"] == 4  # steps 3-4 were trained again
    assert any("checkpoints/4 is unreadable" in r.getMessage() for r in caplog.records)
    assert any(p.name.startswith("corrupt.4.") for p in (workdir / "checkpoints").iterdir())
    assert checkpoint.Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(metrics.read_metrics(workdir)) == strip(rows_before)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state), expected)


# ----------------------------------------------------------------------------------------------
# Config errors: before any compilation, one line, naming the key
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_jit(monkeypatch):
    """Booby-trap jax.jit: a config error must come before anything is compiled."""
    def trap(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")
    monkeypatch.setattr(jax, "jit", trap)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 3}, r"config.mesh: data\*fsdp\*tensor = 3\*1\*1 = 3 but jax.device_count\(\) = 8; set one axis "
                       r"to -1 or make the product 8"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"config.mesh: only one axis may be -1"),
    ({"rollout.batch_size": 8}, r"config.rollout.batch_size=8 must be a positive multiple of data\*fsdp=8 \* "
                                r"ppo.num_minibatches=2 = 16"),
    ({"ptx.coef": 0.5, "ptx.batch_size": 24}, r"config.ptx.batch_size=24 must be a positive multiple of "
                                              r"data\*fsdp=8 \* ppo.num_minibatches=2 = 16"),
    ({"actor.init.source": "checkpoint", "actor.init.path": "/nonexistent/sft"},
     r"config.actor.init.path='/nonexistent/sft' does not exist"),
    ({"rewards.rm_weight": 1.0}, r"config.rewards.rm_weight=1.0 but config.reward.init.source='none'"),
    ({"critic.init.source": "reward"}, r"config.critic.init.source='reward' needs a reward model \(config.reward.init\)"),
    ({"critic.type": "bogus"}, r"config.critic.type='bogus' \(allowed: 'token', 'shared', 'sequence'\)"),
    ({"reward.init.source": "scratch"}, r"config.reward.init.source='scratch' \(allowed: 'none', 'checkpoint', 'hf'\)"),
    ({"kl.blowup_threshold": 0.0}, r"config.kl.blowup_threshold=0.0: need > 0"),
    ({"rollout.top_k": 5}, r"config.rollout.top_k=5, top_p=1.0: RL samples from and trains the unfiltered"),
    ({"rollout.top_p": 0.9}, r"config.rollout.top_k=0, top_p=0.9: RL samples from and trains the unfiltered"),
    ({"num_steps": 0}, r"config.num_steps=0 must be a positive integer"),
    ({"rollout.max_new_tokens": 0}, r"config.rollout.max_new_tokens=0 must be a positive integer"),
    ({"rollout.batch_size": -16}, r"config.rollout.batch_size=-16 must be a positive integer"),
    ({"data.min_prompt_len": 9}, r"config.data.min_prompt_len=9: need 1..rollout.prompt_len"),
])
def test_ppo_config_errors_are_one_line_and_come_before_compilation(tmp_path, no_jit, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        ppo.train(ppo_config(**overrides), str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # not even config.json


def test_workdir_and_init_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--workdir='.*/file' exists and is not a directory"):
        setup.validate_workdir(tmp_path / "file")
    not_hf = tmp_path / "not_hf"  # e.g. a run dir: config.json (the run's config) but no safetensors weights
    not_hf.mkdir()
    (not_hf / "config.json").write_text("{}")
    (not_hf / "pytorch_model.bin").write_bytes(b"pickled")
    init = ml_collections.ConfigDict(dict(source="hf", path=str(not_hf)))
    with pytest.raises(ValueError, match=r"config.init.path='.*/not_hf' is not a Hugging Face model directory: "
                                         r"config.init.source='hf' needs config.json \+ \*.safetensors"):
        loading.check_init(init)
    (not_hf / "model.safetensors").write_bytes(b"")
    loading.check_init(init)  # now it looks like one


@pytest.mark.parametrize("script, flag, message", [
    ("train_sft.py", "--config.batch_size=eight", r"flag --config.batch_size=eight: invalid literal for int\(\)"),
    ("train_rm.py", "--config.optim.learning_rate=fast", r"flag --config.optim.learning_rate=fast: could not convert "
                                                          r"string to float"),
    ("train_ppo.py", "--config.rollout.batch_size=1.5", r"flag --config.rollout.batch_size=1.5: invalid literal"),
    ("train_ppo.py", "--config.fast_compile=maybe", r"flag --config.fast_compile=maybe: .*Non-boolean argument"),
    *[(script, f"--config.{section}.lerning_rate=0.1", rf"unknown config key 'lerning_rate' in --config.{section}."
                                                         rf"lerning_rate \(config.{section} has no field 'lerning_rate'; "
                                                         r"did you mean 'learning_rate'\?\)")
      for script, section in (("train_sft.py", "optim"), ("train_rm.py", "optim"), ("train_ppo.py", "actor.optim"))],
    # a misspelt top-level key and a misspelt section (ml_collections raises these while absl parses flags)
    ("train_ppo.py", "--config.actor_chekpoint=x", r"unknown config key 'actor_chekpoint' in --config.actor_chekpoint "
                                                   r"\(config has no field 'actor_chekpoint'"),
    ("train_sft.py", "--config.optm.learning_rate=0.1", r"unknown config key 'optm' .*did you mean 'optim'\?"),
])
def test_scripts_reject_wrong_types_and_unknown_keys_at_flag_parsing(tmp_path, script, flag, message):
    """Locked ml_collections config flags (cli.define_config_flag): a value of the wrong type or
    an unknown key is a one-line `FATAL Flags parsing error` naming the key, exit code 1, before
    the trainer is even called (no workdir, no traceback)."""
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / script), f"--workdir={tmp_path / 'run'}", flag],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(errors) == 1 and re.search("^FATAL Flags parsing error: .*" + message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------
def test_tokenizer_with_custom_code_is_refused_without_running_it(tmp_path):
    """A tokenizer dir whose tokenizer_config.json maps to a Python class of its own: refused with
    one line naming the file; the module (which would drop a marker file) never runs."""
    tokenizer_dir, marker = tmp_path / "tok", tmp_path / "code_ran"
    tasks.save_tokenizer(tokenizer_dir)
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    config_file.write_text(json.dumps(config))
    (tokenizer_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: 'auto_map' asks for custom tokenizer code") as error:
        loading.load_tokenizer(str(tokenizer_dir))
    assert "\n" not in str(error.value) and not marker.exists()
    tasks.save_tokenizer(tmp_path / "clean")  # the same tokenizer without the custom-code entry loads
    assert loading.load_tokenizer(str(tmp_path / "clean")).encode("hello", add_special_tokens=False)
    tasks.save_tokenizer(tmp_path / "run" / "tokenizer")  # a run dir: its tokenizer/ copy is the one loaded
    assert loading.load_tokenizer(tmp_path / "run").get_vocab() == loading.load_tokenizer(tmp_path / "clean").get_vocab()
    with pytest.raises(ValueError, match=r"has no tokenizer.json / tokenizer_config.json \(nor a tokenizer/"):
        loading.load_tokenizer(tmp_path / "empty")


LOADING_CODE = [*sorted((REPO / "rlhf_jax").rglob("*.py")), *sorted((REPO / "experiments").glob("train_*.py")),
                REPO / "experiments" / "run_pipeline.py", REPO / "experiments" / "sweep.py",
                *sorted((REPO / "configs").glob("*.py"))]
UNSAFE = re.compile(r"\bimport (c?pickle|dill|cloudpickle|joblib|marshal)\b|pickle\.loads?\(|torch\.load\(|"
                    r"allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True|\bexec\(|(?<![.\w])eval\(")


def test_no_pickle_no_remote_code_no_eval_in_the_loading_code():
    """Everything the trainers, pipeline and configs read goes through safetensors, Orbax or JSON."""
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in LOADING_CODE if path.exists()
                 for number, line in enumerate(path.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert offenders == []
    tokenizer_calls = [line for path in LOADING_CODE if path.exists() for line in path.read_text().splitlines()
                       if "AutoTokenizer.from_pretrained(" in line]
    assert tokenizer_calls and all("trust_remote_code=True" not in line for line in tokenizer_calls)
