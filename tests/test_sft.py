"""SFT trainer: same losses on any mesh, exact resume after SIGTERM, a SIGTERMed script on 1 device
resumed on 8, config errors, NaN stop.

Compilation dominates on CPU: every run uses `fast_compile` (XLA backend optimisation off; all runs
compared here use it) and the session's persistent compilation cache, so the reference run's
programs are loaded, not recompiled, by the later runs on the same mesh.
"""
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import sft as sft_configs
from rlhf_jax import checkpoint, loading, metrics, sharding, tasks
from rlhf_jax.models import Transformer
from rlhf_jax.trainers import loop, sft

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 40
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """64 training / 16 held-out demonstrations of the built-in task, its tokenizer, a TFDS cache."""
    root = tmp_path_factory.mktemp("sft_data")
    tasks.write_demonstrations(root / "train.jsonl", tasks.sample_examples(64, seed=0), seed=0)
    tasks.write_demonstrations(root / "eval.jsonl", tasks.sample_examples(16, seed=0, split="heldout"), seed=1)
    tasks.save_tokenizer(root / "tokenizer")
    return root


def tiny_config(files, **overrides):
    config = sft_configs.get_config("tiny")
    config.model.update(d_model=32, d_ff=64, n_heads=2)
    config.data.update(train=str(files / "train.jsonl"), eval=str(files / "eval.jsonl"),
                       tokenizer=str(files / "tokenizer"), max_len=32, cache_dir=str(files / "tfds"))
    config.update(num_steps=NUM_STEPS, batch_size=8, log_every=1, eval_every=0, fast_compile=True)
    config.eval.update(batch_size=8, num_batches=1, num_samples=2, max_new_tokens=4)
    config.optim.update(decay_steps=NUM_STEPS)  # the schedule does not depend on a shortened first half
    config.checkpoint.save_every = 1000
    config.update_from_flattened_dict(overrides)  # dotted keys: 'a.b.c'
    return config


def without_timings(rows):
    """Rows minus timings, and minus the end-of-run evaluation of a shorter first half."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")
             and not (k.startswith("eval/") and row is not rows[-1])} for row in rows]


def final_params(workdir):
    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return jax.device_get(loading.load_model(str(workdir), mesh=one_device)[1])


def assert_close_rows(rows, reference, rtol, keys=("loss", "accuracy", "grad_norm", "eval/loss")):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in keys:
            if key in ref:
                np.testing.assert_allclose(row[key], ref[key], rtol=rtol, err_msg=f"step {row['step']} {key}")


@pytest.fixture(scope="module")
def reference_run(task_files, tmp_path_factory):
    """The uninterrupted run on mesh data=8: metrics rows, final parameters and its workdir."""
    workdir = tmp_path_factory.mktemp("sft_ref")
    result = sft.train(tiny_config(task_files, **{"mesh.data": 8}), str(workdir))
    assert result.step == NUM_STEPS and not result.preempted
    return metrics.read_metrics(workdir), final_params(workdir), workdir


def test_training_lowers_the_loss_and_writes_the_run_files(reference_run):
    rows, _, workdir = reference_run
    assert len(rows) == NUM_STEPS
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.8 * np.mean([r["loss"] for r in rows[:5]])
    assert rows[-1]["eval/loss"] < rows[0]["loss"]
    assert all(r["nonfinite_steps"] == 0 for r in rows)
    # warmup 5 steps then cosine: lr logged at step s is schedule(s - 1)
    np.testing.assert_allclose([rows[0]["lr"], rows[5]["lr"]], [0.0, 3e-3], atol=1e-9)
    # The run directory has everything the DESIGN promises.
    assert json.loads((workdir / "config.json").read_text())["num_steps"] == NUM_STEPS
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and samples[0]["step"] == NUM_STEPS and samples[0]["prompt"].startswith("<bos> <user>")
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    assert checkpoint.Checkpointer(workdir / "checkpoints").all_steps() == [NUM_STEPS]


def test_fsdp_tensor_mesh_logs_the_same_losses(task_files, reference_run, tmp_path):
    """3 steps on data=2, fsdp=2, tensor=2 (no eval: only the train step is compiled for this mesh)."""
    config = tiny_config(task_files, num_steps=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                     "data.eval": ""})
    sft.train(config, str(tmp_path))
    rows = metrics.read_metrics(tmp_path)
    assert_close_rows(rows, reference_run[0][:3], rtol=1e-4, keys=("loss", "accuracy", "grad_norm"))


def test_sigterm_then_rerun_resumes_exactly(task_files, reference_run, tmp_path, sigterm_after_step):
    """SIGTERM arrives while step 9 is logged: step 10 finishes, is checkpointed, the call returns
    `preempted`; the same call again ends exactly (metrics and parameters) where the
    uninterrupted run ends."""
    sigterm_after_step(9)
    first = sft.train(tiny_config(task_files, **{"mesh.data": 8}), str(tmp_path))
    assert first.preempted and first.step == 10
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [10]
    second = sft.train(tiny_config(task_files, **{"mesh.data": 8}), str(tmp_path))
    assert second.step == NUM_STEPS and not second.preempted
    rows, params, _ = reference_run
    assert without_timings(metrics.read_metrics(tmp_path)) == without_timings(rows)
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path), params)


def _script(workdir, env, *flags):
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "train_sft.py"), "--config",
                             str(REPO / "configs" / "sft.py") + ":tiny", f"--workdir={workdir}", *flags],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _flags(files):
    """tiny_config(files) as command-line overrides (the mesh is left to the device count)."""
    return [f"--config.data.train={files / 'train.jsonl'}", f"--config.data.eval={files / 'eval.jsonl'}",
            f"--config.data.tokenizer={files / 'tokenizer'}", f"--config.data.cache_dir={files / 'tfds'}",
            "--config.data.max_len=32", "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.model.n_heads=2", f"--config.num_steps={NUM_STEPS}", "--config.batch_size=8",
            "--config.log_every=1", "--config.eval_every=0", "--config.eval.batch_size=8",
            "--config.eval.num_batches=1", f"--config.optim.decay_steps={NUM_STEPS}", "--config.fast_compile=True",
            "--config.checkpoint.save_every=1000", "--config.eval.max_new_tokens=4", "--config.eval.num_samples=2"]


def test_sigterm_to_the_script_on_one_device_then_resume_on_eight(task_files, reference_run, tmp_path, script_env):
    """The script on 1 device gets a real SIGTERM mid-run, saves and exits 75 (EX_TEMPFAIL: rerun to
    resume) with a clear message; the run resumes on 8 devices (1-device checkpoint onto a data=8 mesh) and ends where the
    uninterrupted 8-device run ends."""
    proc = _script(tmp_path, script_env(1), *_flags(task_files))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output[-3000:]  # setup.EXIT_PREEMPTED
    stopped_at = checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step()
    assert f"Preempted (SIGTERM) at step {stopped_at}: checkpoint" in output, output[-3000:]
    assert "rerun the same command to resume" in output
    assert 2 <= stopped_at < NUM_STEPS

    result = sft.train(tiny_config(task_files, **{"mesh.data": 8}), str(tmp_path))
    assert result.step == NUM_STEPS
    rows, params, _ = reference_run
    assert_close_rows(metrics.read_metrics(tmp_path), rows, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), final_params(tmp_path), params)


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 6}, r"config.batch_size=6 must be a positive multiple of data\*fsdp=8"),
    ({"grad_accum": 3}, r"config.batch_size=8 must be a positive multiple of data\*fsdp=8 \* grad_accum=3 = 24"),
    ({"mesh.data": 3}, r"config.mesh: data\*fsdp\*tensor = 3\*1\*1 = 3 but jax.device_count\(\) = 8"),
    ({"init.source": "checkpoint"}, r"config.init.path is empty but config.init.source='checkpoint'"),
    ({"init.source": "hf", "init.path": "/nonexistent/gpt2"}, r"config.init.path='/nonexistent/gpt2' does not exist"),
    ({"init.source": "pretrained"}, r"config.init.source='pretrained' \(allowed: 'scratch', 'checkpoint', 'hf'\)"),
    ({"data.kind": "prompts"}, r"config.data.kind='prompts' \(allowed: 'demonstrations', 'text'"),
    ({"data.train": "/nonexistent.jsonl"}, r"config.data.train: '/nonexistent.jsonl' does not exist"),
    ({"log_every": 0}, r"config.log_every=0 must be a positive integer"),
])
def test_config_errors_name_the_key_before_any_work(task_files, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        sft.train(tiny_config(task_files, **override), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_errors_come_before_any_compilation(task_files, tmp_path, monkeypatch):
    """A bad config fails before anything is jitted (jax.jit is booby-trapped) or written."""
    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    with pytest.raises(ValueError, match=r"config.eval.batch_size=4 must be a positive multiple of data\*fsdp=8"):
        sft.train(tiny_config(task_files, **{"eval.batch_size": 4}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()



def _small_vocab_run(directory, vocab_size: int) -> pathlib.Path:
    """An SFT run dir whose checkpoint metadata describes a tiny model of `vocab_size` tokens (what a
    later stage reads before any weights: `loading.architecture`)."""
    model_cfg = sft_configs.get_config("tiny").model
    model = Transformer(loading.transformer_config(model_cfg, vocab_size), heads=("lm",))
    saver = checkpoint.Checkpointer(directory / "checkpoints")
    saver.save(1, {"params": {"w": jax.numpy.ones(3)}}, {"stage": "sft", "model": loading.model_meta(model)})
    saver.close()
    return directory


def _data_errors(files, tmp_path):
    """(overrides, the one-line error) of data that does not fit the run: a batch larger than the
    data, a tokenizer with more ids than the model's vocabulary (a fresh model, a checkpoint's)."""
    tokenizer, train = files / "tokenizer", files / "train.jsonl"
    small = _small_vocab_run(tmp_path / "small_vocab", 50)
    return [({"batch_size": 72}, f"config.batch_size=72 is larger than the 64 examples in {train}: an epoch would have "
                                 "no step; lower config.batch_size (to at most 64) or add data"),
            ({"model.vocab_size": 40}, f"config.data.tokenizer='{tokenizer}': the tokenizer has 120 tokens (ids up to "
                                       "119) but config.model.vocab_size=40; set config.model.vocab_size to 0 (= the "
                                       "tokenizer's size) or at least 120"),
            ({"init.source": "checkpoint", "init.path": str(small)},
             f"config.data.tokenizer='{tokenizer}': the tokenizer has 120 tokens (ids up to 119) but "
             f"config.init.path='{small}' holds a model with vocab_size=50; use the tokenizer that model was trained "
             "with (leave config.data.tokenizer empty for the one recorded with it) or a model whose vocabulary "
             "holds 120 tokens")]


def test_data_that_does_not_fit_is_one_line_naming_the_key_before_any_compilation(task_files, tmp_path, monkeypatch):
    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    for i, (override, message) in enumerate(_data_errors(task_files, tmp_path)):
        with pytest.raises(ValueError) as error:
            sft.train(tiny_config(task_files, **override), str(tmp_path / f"run{i}"))
        assert str(error.value) == message
        run = tmp_path / f"run{i}"
        assert not (run / "checkpoints").exists() and not (run / "config.json").exists()  # nothing trained


def test_the_script_prints_data_that_does_not_fit_as_one_fatal_line(task_files, tmp_path):
    """What a user sees: `FATAL config error: ...` as the last line, exit status 1, no traceback
    (a batch larger than the data; a bigger tokenizer than the checkpoint's model)."""
    errors = _data_errors(task_files, tmp_path)
    for i, (override, message) in enumerate([errors[0], errors[2]]):
        flags = _flags(task_files) + [f"--config.{k}={v}" for k, v in override.items()]
        proc = subprocess.run([sys.executable, str(REPO / "experiments" / "train_sft.py"), "--config",
                               str(REPO / "configs" / "sft.py") + ":tiny", f"--workdir={tmp_path / f'run{i}'}", *flags],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"FATAL config error: {message}"
        assert "Traceback" not in proc.stderr


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(task_files, reference_run, tmp_path):
    """Start from an SFT checkpoint whose weights are NaN: every step is skipped and counted,
    then the run stops with an error naming the steps; no checkpoint of the bad state is written."""
    _, params, reference_dir = reference_run
    meta = checkpoint.read_meta(reference_dir)
    poisoned = checkpoint.Checkpointer(tmp_path / "poisoned")
    poisoned.save(1, {"params": jax.tree.map(lambda x: np.full_like(x, np.nan), params)}, meta)
    poisoned.close()
    config = tiny_config(task_files, num_steps=6, max_nonfinite_streak=3,
                         **{"mesh.data": 8, "init.source": "checkpoint", "init.path": str(tmp_path / "poisoned")})
    with pytest.raises(loop.NonFiniteError,
                       match=r"3 consecutive non-finite steps \(1\.\.3\); stopping. Last good checkpoint: none saved"):
        sft.train(config, str(tmp_path / "run"))
    rows = metrics.read_metrics(tmp_path / "run")
    assert [(r["step"], r["nonfinite_steps"], r["nonfinite_streak"]) for r in rows] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert all(np.isnan(r["loss"]) for r in rows)
    assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == []
