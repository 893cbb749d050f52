"""Reliability (issue 7) across the trainers: preemption guard, NaN streaks in the shared loop,
corrupted / interrupted checkpoints (unit level and through a real PPO resume), config errors
before compilation (in-process and through the scripts' flag parsing), safe loading. Issue 14
(data is never lost): workdir ownership, config.json history, the scripts' preemption status.

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


# ----------------------------------------------------------------------------------------------
# Data is never lost (issue 14): a workdir belongs to one stage; config.json describes the
# checkpoints beside it; one exit status for "stopped by a signal after saving"
# ----------------------------------------------------------------------------------------------
def _snapshot(directory):
    """Every file under `directory` with its bytes (what a refused run must leave as it was)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _legacy_run(directory, stage, config):
    """A run dir as trainers wrote it before run.json: checkpoint 2 (meta "stage"), config.json, metrics."""
    saver = checkpoint.Checkpointer(directory / "checkpoints")
    saver.save(2, {"params": {"w": jnp.ones(3)}}, {"stage": stage})
    saver.close()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))


def _pipeline_dir(directory):
    from rlhf_jax.pipeline import layout

    for stage in ("task", "pretrain"):
        layout.mark_done(directory / stage, {"stage": stage, "seconds": 1.0, "info": {}, "settings": None})
    (directory / "config.json").write_text("{}")


def _new_rm_run(directory):
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"stage": "rm", "run_id": "0" * 32}))
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')


OWNED = {  # directory -> (its stage, how the refusal names it)
    "ppo run (no run.json)": (lambda d: _legacy_run(d, "ppo", {"rollout": {}}), "ppo",
                              "an RL run (experiments/train_ppo.py) (from checkpoint 2 metadata)"),
    "sft run (no run.json)": (lambda d: _legacy_run(d, "sft", {"data": {"kind": "demonstrations"}}), "sft",
                              "an SFT run (experiments/train_sft.py) (from checkpoint 2 metadata)"),
    "pretraining run (no run.json)": (lambda d: _legacy_run(d, "sft", {"data": {"kind": "text"}}), "pretrain",
                                      "a pretraining run (experiments/train_sft.py, data.kind='text') (from checkpoint"),
    "pipeline (no run.json)": (_pipeline_dir, "pipeline",
                               "a pipeline (experiments/run_pipeline.py) (from finished pipeline stages "
                               "['pretrain', 'task'])"),
    "rm run (run.json)": (_new_rm_run, "rm", "a reward-model run (experiments/train_rm.py) (from run.json)"),
}


def _trainer(stage):
    from configs import pipeline as pipeline_configs
    from configs import rm as rm_configs
    from configs import sft as sft_configs
    from rlhf_jax import pipeline
    from rlhf_jax.trainers import rm, sft

    return {"pretrain": lambda d: sft.train(sft_configs.get_config("tiny_pretrain"), str(d)),
            "sft": lambda d: sft.train(sft_configs.get_config("tiny"), str(d)),
            "rm": lambda d: rm.train(rm_configs.get_config("tiny"), str(d)),
            "ppo": lambda d: ppo.train(ppo_config(), str(d)),
            "pipeline": lambda d: pipeline.run_pipeline(pipeline_configs.get_config("tiny"), d, echo=lambda s: None),
            }[stage]


@pytest.mark.parametrize("owned, stage", [(o, s) for o in OWNED for s in ("pretrain", "sft", "rm", "ppo", "pipeline")
                                          if OWNED[o][1] != s])
def test_a_workdir_of_another_stage_is_refused_in_one_line_before_anything_is_written(tmp_path, no_jit, owned, stage):
    make, _, what = OWNED[owned]
    workdir = tmp_path / "run"
    make(workdir)
    before = _snapshot(workdir)
    with pytest.raises(setup.WorkdirError) as error:
        _trainer(stage)(workdir)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"--workdir {workdir} holds {what}"), text
    assert text.endswith("nothing was changed: give this run its own --workdir")
    assert _snapshot(workdir) == before  # metrics, config.json, checkpoints: byte for byte; no run.json added


def test_claiming_a_workdir_records_the_run_and_adopts_a_matching_older_one(tmp_path):
    record = setup.claim_workdir(tmp_path / "new", "rm")
    assert set(record) == {"stage", "run_id", "created", "version"} and record["stage"] == "rm"
    assert json.loads((tmp_path / "new" / "run.json").read_text()) == record
    assert setup.claim_workdir(tmp_path / "new", "rm") == record  # the same run, again
    old = tmp_path / "old_sft"
    _legacy_run(old, "sft", {"data": {"kind": "demonstrations"}})
    before = _snapshot(old)
    adopted = setup.claim_workdir(old, "sft")
    assert adopted["stage"] == "sft" and adopted["inferred_from"] == "checkpoint 2 metadata"
    assert _snapshot(old) == {**before, "run.json": (old / "run.json").read_bytes()}


@pytest.mark.parametrize("make, message", [
    (lambda d: _legacy_run(d, "sft", None), r"holds checkpoints of a pretraining or SFT run \(checkpoint 2\) but no "
                                            r"config.json to tell which; nothing was changed"),
    (lambda d: [d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1}\n')],
     r"holds metrics.jsonl of a run whose stage cannot be told .*; nothing was changed"),
    (lambda d: [d.mkdir(), (d / "run.json").write_text("{trunc")], r"run.json is unreadable or names no known stage"),
])
def test_a_workdir_whose_owner_cannot_be_told_is_refused_and_left_alone(tmp_path, make, message):
    workdir = tmp_path / "run"
    make(workdir)
    before = _snapshot(workdir)
    with pytest.raises(setup.WorkdirError, match=message):
        setup.claim_workdir(workdir, "sft")
    assert _snapshot(workdir) == before


def test_the_script_refuses_another_stages_workdir_in_one_line(tmp_path):
    workdir = tmp_path / "ppo_run"
    _legacy_run(workdir, "ppo", {"rollout": {}})
    before = _snapshot(workdir)
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "train_sft.py"), f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == setup.EXIT_ERROR == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"FATAL WorkdirError: --workdir {workdir} holds an RL run (experiments/train_ppo.py) (from checkpoint 2 "
        "metadata), not an SFT run (experiments/train_sft.py); nothing was changed: give this run its own --workdir")
    assert "Traceback" not in proc.stderr
    assert _snapshot(workdir) == before


def test_config_json_is_written_when_training_starts_and_an_earlier_one_is_kept(toy_reference, tmp_path, caplog):
    toy_run(tmp_path, toy_config(), ToyBatches())
    first = (tmp_path / "config.json").read_text()
    recorded = json.loads(first)
    assert {k: v for k, v in recorded.items() if k != "environment"} == toy_config().to_dict()
    # ... and what it ran on: library versions and the machine (rlhf_jax.environment)
    import jaxlib

    assert recorded["environment"]["versions"]["jaxlib"] == jaxlib.__version__
    assert recorded["environment"]["device_count"] == jax.device_count()
    assert recorded["environment"]["cpu_count"] == os.cpu_count()
    # a rerun with nothing left to train (a finished stage run again, here with other settings) writes nothing
    toy_run(tmp_path, toy_config(log_every=2), ToyBatches(), resume=True)
    assert (tmp_path / "config.json").read_text() == first and not list(tmp_path.glob("config.*.json"))
    # continuing with changed settings: config.json is the new config, the earlier one is kept
    with caplog.at_level(logging.WARNING):
        toy_run(tmp_path, toy_config(num_steps=10), ToyBatches(), resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 10
    assert (tmp_path / "config.1.json").read_text() == first
    assert any(f"{tmp_path}: settings changed since the earlier checkpoints (num_steps); continuing from step 8 "
               "with the new config, the earlier one kept as config.1.json" == r.getMessage() for r in caplog.records)
    toy_run(tmp_path, toy_config(num_steps=11, log_every=2), ToyBatches(), resume=True)
    assert json.loads((tmp_path / "config.2.json").read_text())["num_steps"] == 10  # every earlier one is kept
    assert (tmp_path / "config.1.json").read_text() == first


def test_a_run_that_fails_before_training_leaves_config_json_and_metrics_alone(tmp_path):
    """The stage's own dir, rerun with a data file that no longer loads: it stops before training
    and config.json / metrics.jsonl still describe the checkpoints of the earlier run."""
    from configs import sft as sft_configs
    from rlhf_jax.trainers import sft

    workdir = tmp_path / "sft"
    _legacy_run(workdir, "sft", {"data": {"kind": "demonstrations"}, "num_steps": 2})
    tasks.save_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "demos.jsonl").write_text('{"prompt": "truncated\n')
    config = sft_configs.get_config("tiny")
    config.data.update(train=str(tmp_path / "demos.jsonl"), tokenizer=str(tmp_path / "tokenizer"))
    before = {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(Exception, match=r"demos.jsonl, line 1: malformed JSON"):
        sft.train(config, str(workdir))
    assert {name: (workdir / name).read_bytes() for name in before} == before
    assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2]


SCRIPT_STOPS = {  # script -> (module whose entry point is replaced, its name, what the fake does)
    "train_sft.py": ("rlhf_jax.trainers.sft", "train", "return PREEMPTED"),
    "train_rm.py": ("rlhf_jax.trainers.rm", "train", "return PREEMPTED"),
    "train_ppo.py": ("rlhf_jax.trainers.ppo", "train", "return PREEMPTED"),
    "run_pipeline.py": ("rlhf_jax.pipeline", "run_pipeline", "raise STOP"),
    "sweep.py": ("rlhf_jax.pipeline", "run_sweep", "raise STOP"),
    "compare_algorithms.py": ("rlhf_jax.pipeline.compare", "run_comparison", "raise STOP"),
}


@pytest.mark.parametrize("script", list(SCRIPT_STOPS))
def test_every_script_exits_with_the_one_preemption_status(tmp_path, script):
    """Each script, its trainer / pipeline replaced by one that reports "stopped by a signal after
    saving" (the loop's `preempted` result, or the pipeline's StageInterrupted), exits with
    setup.EXIT_PREEMPTED = 75 (EX_TEMPFAIL), the status schedulers are told to requeue on."""
    module, name, action = SCRIPT_STOPS[script]
    workdir = tmp_path / "run"
    workdir.mkdir()
    if script == "sweep.py":  # it wants a pipeline dir
        (workdir / "run.json").write_text(json.dumps({"stage": "pipeline"}))
    code = "\n".join([
        "import runpy, sys", f"import {module} as target", "from rlhf_jax.trainers.loop import LoopResult",
        "from rlhf_jax.pipeline.run import StageInterrupted",
        "PREEMPTED = LoopResult(state=None, step=3, preempted=True, last_row={})",
        "STOP = StageInterrupted('ppo stopped at step 3 on a signal')",
        f"def fake(*args, **kwargs):\n    {action}", f"target.{name} = fake",
        f"sys.argv = [{script!r}, '--workdir={workdir}']",
        f"runpy.run_path({str(REPO / 'experiments' / script)!r}, run_name='__main__')"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == setup.EXIT_PREEMPTED == 75, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
