"""Orbax checkpoints: round trip onto another mesh, keep-last-N, corrupt-step fallback, hand-off,
a readable checkpoint of another shape (config error, nothing moved), failed saves (one line, last good step kept)."""
import errno
import logging
import os
import re
import resource
import signal
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import checkpoint, optim, sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.trainers import state as train_state

TINY = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
OPTIM = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, decay_steps=0, final_lr_ratio=0.1,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))


def _state_on(mesh, params=None):
    """A TrainState on `mesh` (params from `params` or a fixed init) and its shardings/shape."""
    model = Transformer(TINY)
    optimizer, _ = optim.make_optimizer(OPTIM, num_steps=10)
    shape = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    state_sh = train_state.train_state_shardings(optimizer, shape, sharding.param_shardings(model, mesh), mesh)
    if params is None:
        params = jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(0))
    state = train_state.init_train_state(params, optimizer, jax.random.PRNGKey(7), state_sh)
    return state, state_sh, jax.eval_shape(lambda: state)


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 jax.device_get(a), jax.device_get(b))


def test_restore_onto_a_different_mesh_and_resume_metadata(tmp_path):
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, _, _ = _state_on(mesh8)
    # Make the optimizer state non-trivial so its restore is checked too.
    state = state.replace(step=jnp.int32(5), opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    saver = checkpoint.Checkpointer(tmp_path / "ckpt")
    saver.save(5, train_state.state_items(state), {"data": {"position": 40}, "model": {"d_model": 32}})
    saver.close()

    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    _, sh1, shape1 = _state_on(one)
    restored, meta, step = train_state.restore_or_init(checkpoint.Checkpointer(tmp_path / "ckpt"), shape1, sh1,
                                                  init_fn=lambda: pytest.fail("should resume, not init"))
    assert step == 5 and meta == {"data": {"position": 40}, "model": {"d_model": 32}}
    _assert_trees_equal(restored, state)
    q = restored.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.mesh.devices.size == 1 and len(q.addressable_shards) == 1

    # ... and back from 1 device onto a (data=1, fsdp=4, tensor=2) mesh.
    saver = checkpoint.Checkpointer(tmp_path / "ckpt1")
    saver.save(6, train_state.state_items(restored), {})
    saver.close()
    mesh_b = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, sh_b, shape_b = _state_on(mesh_b)
    back, _, _ = train_state.restore_or_init(checkpoint.Checkpointer(tmp_path / "ckpt1"), shape_b, sh_b, lambda: None)
    _assert_trees_equal(back, state)
    assert back.params["layers"]["attn"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_empty_directory_initialises(tmp_path):
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    state, sh, shape = _state_on(mesh)
    got, meta, step = train_state.restore_or_init(checkpoint.Checkpointer(tmp_path), shape, sh, lambda: state)
    assert got is state and meta == {} and step is None


def test_keep_last_n_and_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    saver = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        saver.save(step, {"params": {"w": jnp.full((4, 2), float(step))}}, {"step": step})
    saver.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]

    for chunk in (tmp_path / "3" / "params").rglob("d/*"):  # truncate every data file of step 3
        chunk.write_bytes(chunk.read_bytes()[:5])
    target = {"params": {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}}
    reader = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    with caplog.at_level(logging.WARNING):
        restored = reader.restore(target)
    assert restored.step == 2 and restored.meta == {"step": 2}
    np.testing.assert_array_equal(restored.items["params"]["w"], np.full((4, 2), 2.0))
    assert any("3 is unreadable" in r.getMessage() for r in caplog.records)
    # The bad step is moved aside (kept for inspection) so a resumed run can save step 3 again.
    assert reader.all_steps() == [2] and any(p.name.startswith("corrupt.3.") for p in tmp_path.iterdir())
    reader.save(3, {"params": {"w": jnp.zeros((4, 2))}}, {"step": 3})
    reader.close()
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [2, 3]


def test_missing_files_fall_back_and_all_bad_is_an_error(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(1, {"params": {"w": jnp.ones(3)}}, {})
    saver.close()
    for chunk in (tmp_path / "1" / "params").rglob("d/*"):
        chunk.unlink()
    with pytest.raises(RuntimeError, match="No readable checkpoint"):
        checkpoint.Checkpointer(tmp_path).restore({"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})


def test_load_params_and_read_meta_for_stage_hand_off(tmp_path):
    workdir = tmp_path / "sft"
    saver = checkpoint.Checkpointer(workdir / "checkpoints")
    for step in (2, 4):
        saver.save(step, {"params": {"w": jnp.full(3, float(step))}, "train": {"step": jnp.int32(step)}},
                   {"model": {"d_model": step}})
    saver.close()
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    target = checkpoint.abstract_tree({"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
                                      {"w": sharding.replicated(mesh)})
    for path, expected in ((workdir, 4.0), (workdir / "checkpoints", 4.0), (workdir / "checkpoints" / "2", 2.0)):
        np.testing.assert_array_equal(checkpoint.load_params(path, target)["w"], np.full(3, expected))
        assert checkpoint.read_meta(path) == {"model": {"d_model": int(expected)}}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.read_meta(tmp_path / "nope")


def test_metric_writer_resume_drops_rows_after_the_checkpoint(tmp_path):
    from rlhf_jax import metrics

    writer = metrics.MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": jnp.float32(step / 2), "nonfinite_steps": jnp.int32(0)})
    writer.close()
    assert metrics.read_metrics(tmp_path) == [{"step": s, "loss": s / 2, "nonfinite_steps": 0} for s in (1, 2, 3)]
    resumed = metrics.MetricWriter(tmp_path, resume_step=2)  # run resumed from the step-2 checkpoint
    resumed.write(3, {"loss": 9.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(tmp_path)] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="scalar"):
        resumed.write(4, {"loss": np.zeros(2)})


# ----------------------------------------------------------------------------------------------
# A checkpoint that reads fine but is another state is a configuration error, not corruption
# ----------------------------------------------------------------------------------------------
def _two_steps(directory):
    saver = checkpoint.Checkpointer(directory)
    for step in (1, 2):
        saver.save(step, {"params": {"w": jnp.full((4, 2), float(step)), "b": jnp.zeros(2)},
                          "train": {"step": jnp.int32(step)}}, {"stage": "sft"})
    saver.close()


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


W, B, STEP = (jax.ShapeDtypeStruct(s, d) for s, d in (((4, 2), jnp.float32), ((2,), jnp.float32), ((), jnp.int32)))


@pytest.mark.parametrize("target, message", [
    ({"params": {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32), "b": B}, "train": {"step": STEP}},
     r"item 'params' key w: shape \(4, 2\) in the checkpoint, \(4, 3\) in this config"),
    ({"params": {"w": W, "b": B, "c": B}, "train": {"step": STEP}},
     r"item 'params': the config builds keys the checkpoint lacks: c$"),
    ({"params": {"w": W}, "train": {"step": STEP}}, r"item 'params': the checkpoint has keys the config does not build: b$"),
    ({"params": {"w": W, "b": B}, "critic": {"w": W}}, r"it has no item 'critic' \(it holds \['params', 'train'\]\)"),
])
def test_a_readable_checkpoint_of_another_shape_is_a_config_error_and_nothing_moves(tmp_path, target, message):
    _two_steps(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatch) as error:
        checkpoint.Checkpointer(tmp_path).restore(target)
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"checkpoint {tmp_path}/2 does not match the state this config builds")
    assert re.search(message, text.split(": ", 1)[1].split(". Nothing was changed")[0]), text
    assert _listing(tmp_path) == before  # no corrupt.* rename, nothing deleted
    restored = checkpoint.Checkpointer(tmp_path).restore({"params": {"w": W, "b": B}, "train": {"step": STEP}})
    assert restored.step == 2  # the matching config still resumes the newest step


# ----------------------------------------------------------------------------------------------
# A save that fails on an OS error: one line, last good step intact, half-written step removed
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["file size limit (RLIMIT_FSIZE)", "full tmpfs"])
def failing_disk(request, tmp_path):
    """A directory where writing ~1 MB fails with a real OS error inside TensorStore's writer:
    a lowered RLIMIT_FSIZE (EFBIG, any user) or a 256 KiB tmpfs (ENOSPC, needs root + mount)."""
    if request.param.startswith("file size"):
        previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process

        def limit(on: bool):
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, previous[1]) if on else previous)
        yield tmp_path / "ckpt", limit, errno.EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
        return
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount / "ckpt", lambda on: None, errno.ENOSPC
    subprocess.run(["umount", str(mount)], check=True)


def test_failed_save_is_one_error_naming_path_and_os_error_and_keeps_the_last_good_step(failing_disk, caplog):
    directory, limit, code = failing_disk
    saver = checkpoint.Checkpointer(directory, max_to_keep=2)
    for step in (1, 2):
        saver.save(step, {"params": {"w": jnp.full((8,), float(step))}}, {"step": step})
    saver.wait()
    big = {"params": {"w": jnp.asarray(np.random.default_rng(0).random(400_000, np.float32))}}
    limit(True)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(checkpoint.StorageError) as error:
            saver.save(3, big, {"step": 3})
            saver.wait()  # async: the failure surfaces here
    finally:
        limit(False)
    text = str(error.value)
    assert error.value.errno == code and "\n" not in text, text
    assert re.match(rf"could not save step 3 in {directory}: \[Errno {code}\] {os.strerror(code)}: {directory}/3"
                    r"\.orbax-checkpoint-tmp.* The half-written step was removed; steps saved before it are intact "
                    r"\(steps \[1, 2\]\)", text), text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no Orbax thread tracebacks
    saver.close()  # the trainers' `finally`: does not raise the same failure again
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # max_to_keep deleted nothing
    restored = checkpoint.Checkpointer(directory).restore({"params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}})
    assert restored.step == 2 and restored.meta == {"step": 2}
    np.testing.assert_array_equal(restored.items["params"]["w"], np.full(8, 2.0))


def test_uncommitted_save_directories_are_removed_when_a_writer_opens(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(1, {"params": {"w": jnp.ones(3)}}, {})
    saver.close()
    for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000"):
        (tmp_path / name / "params").mkdir(parents=True)
    checkpoint.Checkpointer(tmp_path, read_only=True).close()  # readers (stage hand-off) touch nothing
    assert len(list(tmp_path.glob("*.orbax-checkpoint-tmp*"))) == 2
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
