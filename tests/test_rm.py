"""RM trainer: learns a separable ranking, same losses on any mesh, exact resume after SIGTERM, the
8-device checkpoint continued by the script on 1 device, reward normalisation, SFT -> RM hand-off,
config errors.

Every run uses `fast_compile` and the session's persistent compilation cache (tests/conftest.py).
"""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax
from configs import rm as rm_configs
from conftest import assert_one_line_errors_before_jit, ranking_data_that_does_not_fit
from rlhf_jax import checkpoint, loading, metrics, sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.models import reward as reward_lib
from rlhf_jax.trainers import rm

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 24
BEST_FIRST = ("a", "b", "c")  # the responses' quality order: trivially separable by their one word
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def files(ranking_files):
    return ranking_files("rm_data", BEST_FIRST)


def tiny_config(files, **overrides):
    config = rm_configs.get_config("tiny")
    config.model.update(d_model=32, d_ff=64, n_heads=2)
    config.data.update(train=str(files / "train.jsonl"), eval=str(files / "eval.jsonl"),
                       tokenizer=str(files / "tokenizer"), max_len=32, cache_dir=str(files / "tfds"))
    config.update(num_steps=NUM_STEPS, batch_size=8, log_every=1, fast_compile=True)
    config.eval.batch_size = 8
    config.normalize.num_batches = 2
    config.optim.update(decay_steps=NUM_STEPS, learning_rate=3e-3)
    config.checkpoint.save_every = 1000
    config.update_from_flattened_dict(overrides)  # dotted keys: 'a.b.c'
    return config


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")
             and not (k.startswith("eval/") and row is not rows[-1])} for row in rows]


@pytest.fixture(scope="module")
def reference_run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rm_ref")
    result = rm.train(tiny_config(files, **{"mesh.data": 8}), str(workdir))
    assert result.step == NUM_STEPS
    return metrics.read_metrics(workdir), workdir, result


def test_accuracy_rises_on_a_separable_ranking(reference_run):
    rows, _, result = reference_run
    first = np.mean([r["accuracy"] for r in rows[:3]])
    last = np.mean([r["accuracy"] for r in rows[-3:]])
    assert first < 0.8 and last > 0.95, (first, last)
    assert rows[-1]["eval/accuracy"] > 0.95  # held-out prompts, same separable responses
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # chance level is log 2 = 0.693 per pair
    np.testing.assert_allclose(rows[0]["loss"], np.log(2.0), atol=0.15)  # near-zero init head ~ chance


def test_reward_normalisation_centres_the_best_responses(files, reference_run):
    """The stored norm makes `score` average 0 over the rank-0 responses of the first
    normalize.num_batches=2 training batches (fixed file order, batch 8) — recomputed here with
    the public scoring API on [B, T] rows."""
    _, workdir, result = reference_run
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    model, params, norm = loading.load_reward_model(str(workdir), mesh=mesh)
    assert norm["std"] == 1.0 and result.last_row["reward_norm/mean"] == norm["mean"]
    assert json.loads((workdir / "reward_norm.json").read_text()) == norm

    from rlhf_jax import data

    tokenizer = loading.load_tokenizer(str(files / "tokenizer"))
    split = data.load_split("rankings", str(files / "train.jsonl"), tokenizer, max_len=32, batch_format="ranking",
                            data_dir=str(files / "tfds"))
    best_ids, best_mask = [], []
    for batch in split.iterator(8, shuffle=False, num_epochs=1):
        best = batch["ranks"] == 0
        best_ids.append(batch["input_ids"][best])
        best_mask.append(batch["attention_mask"][best])
        if len(best_ids) == 2:
            break
    ids, mask = np.concatenate(best_ids), np.concatenate(best_mask)
    assert ids.shape == (16, 32)
    normalised, raw = jax.jit(lambda p, i, m: (reward_lib.score(model, p, norm, i, m),
                                               reward_lib.raw_scores(model, p, i, m)))(params, ids, mask)
    np.testing.assert_allclose(float(jnp.mean(normalised)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(normalised), np.asarray(raw) - norm["mean"], atol=1e-5)


def test_fsdp_tensor_mesh_logs_the_same_losses(files, reference_run, tmp_path):
    rm.train(tiny_config(files, num_steps=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path))
    rows, reference = metrics.read_metrics(tmp_path), reference_run[0][:3]
    for row, ref in zip(rows, reference):
        np.testing.assert_allclose([row["loss"], row["score/mean"]], [ref["loss"], ref["score/mean"]], rtol=1e-4)


def _script_flags(files):
    """tiny_config(files) as command-line overrides (the mesh is left to the device count)."""
    return [f"--config.data.train={files / 'train.jsonl'}", f"--config.data.eval={files / 'eval.jsonl'}",
            f"--config.data.tokenizer={files / 'tokenizer'}", f"--config.data.cache_dir={files / 'tfds'}",
            "--config.data.max_len=32", "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.model.n_heads=2", f"--config.num_steps={NUM_STEPS}", "--config.batch_size=8",
            "--config.log_every=1", "--config.eval.batch_size=8", "--config.normalize.num_batches=2",
            f"--config.optim.decay_steps={NUM_STEPS}", "--config.optim.learning_rate=3e-3",
            "--config.checkpoint.save_every=1000", "--config.fast_compile=True"]


def test_sigterm_resume_is_exact_and_the_script_continues_on_one_device(files, reference_run, tmp_path,
                                                                         sigterm_after_step, script_env):
    """SIGTERM while step 5 is logged: step 6 is finished and checkpointed (8 devices), the call
    returns `preempted`. (a) The same call again equals the uninterrupted run exactly (metrics,
    parameters, stored normalisation). (b) A copy of the step-6 run dir is continued by the script
    on ONE device (8-device checkpoint onto a 1-device mesh) and ends where the reference ends."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    sigterm_after_step(5)
    first = rm.train(tiny_config(files, **{"mesh.data": 8}), str(run))
    assert first.preempted and first.step == 6
    assert checkpoint.Checkpointer(run / "checkpoints").all_steps() == [6]
    shutil.copytree(run, copy)

    second = rm.train(tiny_config(files, **{"mesh.data": 8}), str(run))
    assert second.step == NUM_STEPS and not second.preempted
    rows, workdir, _ = reference_run
    assert without_timings(metrics.read_metrics(run)) == without_timings(rows)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    _, resumed, norm = loading.load_reward_model(str(run), mesh=mesh)
    _, straight, norm_ref = loading.load_reward_model(str(workdir), mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
    assert norm == norm_ref

    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "train_rm.py"), "--config",
                           str(REPO / "configs" / "rm.py") + ":tiny", f"--workdir={copy}", *_script_flags(files)],
                          cwd=REPO, env=script_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"RM finished at step {NUM_STEPS}" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:])
    got = metrics.read_metrics(copy)
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for row, ref in zip(got, rows):
        np.testing.assert_allclose([row["loss"], row["score/mean"]], [ref["loss"], ref["score/mean"]], rtol=1e-4,
                                   atol=1e-5, err_msg=f"step {row['step']}")  # score/mean is ~0: atol
    np.testing.assert_allclose(got[-1]["eval/accuracy"], rows[-1]["eval/accuracy"], rtol=1e-4)
    _, continued, norm_one = loading.load_reward_model(str(copy), mesh=sharding.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), jax.device_get(continued),
                 jax.device_get(straight))
    np.testing.assert_allclose(norm_one["mean"], norm_ref["mean"], rtol=1e-3, atol=1e-5)
    assert checkpoint.read_meta(copy)["stage"] == "rm" and json.loads((copy / "config.json").read_text())[
        "mesh"]["data"] == -1


def test_rm_starts_from_an_sft_checkpoint(files, tmp_path):
    """Hand-off: the RM trunk equals the SFT trunk, the unembedding is dropped, a scalar head added."""
    lm = Transformer(TransformerConfig(vocab_size=128, d_model=32, n_heads=2, d_ff=64, max_len=64))
    lm_params = jax.device_get(jax.jit(lambda r: init_params(lm, r))(jax.random.PRNGKey(3)))
    saver = checkpoint.Checkpointer(tmp_path / "sft" / "checkpoints")
    saver.save(7, {"params": lm_params}, {"model": loading.model_meta(lm),
                                          "tokenizer": str(files / "tokenizer")})
    saver.close()
    config = tiny_config(files, **{"init.source": "checkpoint", "init.path": str(tmp_path / "sft"),
                                   "data.tokenizer": ""})
    assert loading.tokenizer_path(config.data.tokenizer, config.init) == str(files / "tokenizer")  # recorded by SFT
    model = loading.architecture(config.init, config.model, heads=("value",))
    assert model.config == lm.config and model.heads == ("value",)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = loading.initial_params(config.init, model, sharding.param_shardings(model, mesh), jax.random.PRNGKey(0))
    assert "lm_head" not in params and params["value_head"]["kernel"].shape == (32, 1)
    trunk = {k: v for k, v in lm_params.items() if k != "lm_head"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get({k: params[k] for k in trunk}), trunk)

    # the research-code loaders read the same checkpoint (one device, dropout off) and refuse the wrong kind
    loaded, loaded_params = rlhf_jax.load(tmp_path / "sft")
    assert loaded.config == lm.config and loaded.heads == ("lm",)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded_params), lm_params)
    with pytest.raises(ValueError, match=r"the saved model has heads \('lm',\), not \('value',\)"):
        rlhf_jax.load(tmp_path / "sft", heads=("value",))
    with pytest.raises(ValueError, match=r"not a reward-model checkpoint"):
        rlhf_jax.load_reward_model(tmp_path / "sft")


@pytest.mark.parametrize("override, message", [
    ({"num_steps": -1}, r"config.num_steps=-1 must be >= 0"),
    ({"data.kind": "demonstrations"}, r"config.data.kind='demonstrations' \(allowed: 'rankings', 'comparisons', 'hh'\)"),
    ({"init.source": "checkpoint"}, r"config.init.path is empty but config.init.source='checkpoint': give the path of "
                                    r"the starting point \(--config.init.path=...\)"),
    ({"eval.batch_size": 4}, r"config.eval.batch_size=4 must be a positive multiple of data\*fsdp=8"),
])
def test_config_errors_name_the_key_before_any_compilation(files, tmp_path, override, message, monkeypatch):
    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    with pytest.raises(ValueError, match=message):
        rm.train(tiny_config(files, **override), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_data_that_does_not_fit_is_one_line_naming_the_key_before_any_compilation(files, tmp_path, monkeypatch):
    """A batch larger than the training prompts (with config.num_steps set, too) and a tokenizer with more
    ids than the model's vocabulary: one line naming the key, the counts and the file, before any jit."""
    assert_one_line_errors_before_jit(lambda override, workdir: rm.train(tiny_config(files, **override), workdir),
                                      ranking_data_that_does_not_fit(files), tmp_path, monkeypatch)


def test_presets_build_and_later_stage_presets_require_a_checkpoint():
    for preset in rm_configs.PRESETS:
        config = rm_configs.get_config(preset)
        assert config.num_steps == 0 and config.num_epochs == 1  # one epoch by default
    assert rm_configs.get_config("gpt2").init.source == "checkpoint"
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        rm_configs.get_config("big")
