"""DPO trainer: policy = reference at step 1 (loss log 2, ties 1/2), learns a separable K=4 ranking,
precomputed reference = in-step reference, exact resume after SIGTERM and the 8-device checkpoint
continued by the script on 1 device, SimPO without a reference, the HH-RLHF sample end to end,
config errors.

Every run uses `fast_compile` and the session's persistent compilation cache (tests/conftest.py).
"""
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import dpo as dpo_configs
from conftest import assert_one_line_errors_before_jit, ranking_data_that_does_not_fit
from rlhf_jax import checkpoint, loading, metrics, sharding
from rlhf_jax.trainers import dpo

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 10
BEST_FIRST = ("a", "b", "c", "d")  # the responses' quality order: separable by their one word
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def files(ranking_files):
    return ranking_files("dpo_data", BEST_FIRST)


FLAGS = {"model.d_model": 32, "model.d_ff": 64, "model.n_heads": 2, "data.max_len": 32, "num_steps": NUM_STEPS,
         "batch_size": 8, "log_every": 1, "eval.batch_size": 8, "optim.decay_steps": NUM_STEPS,
         "optim.learning_rate": 3e-3, "checkpoint.save_every": 1000, "fast_compile": True}


def tiny_config(files, variant="dpo", **overrides):
    config = dpo_configs.get_config(f"tiny,{variant}")
    config.data.update(train=str(files / "train.jsonl"), eval=str(files / "eval.jsonl"),
                       tokenizer=str(files / "tokenizer"), cache_dir=str(files / "tfds"))
    config.update_from_flattened_dict({**FLAGS, **overrides})  # dotted keys: 'a.b.c'
    return config


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.fixture(scope="module")
def reference_run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo_ref")
    result = dpo.train(tiny_config(files, **{"mesh.data": 8}), str(workdir))
    assert result.step == NUM_STEPS
    return metrics.read_metrics(workdir), workdir


def test_first_step_policy_equals_reference_then_learns_the_ranking(reference_run):
    """Step 1's metrics are computed before its update, with policy = reference: every pair has h = 0,
    so the loss is log 2 exactly, the implicit rewards are 0 and every pair is a tie (accuracy 1/2).
    On the separable ranking the implicit reward then orders the pairs and the loss falls."""
    rows, _ = reference_run
    first = rows[0]
    np.testing.assert_allclose(first["loss"], math.log(2.0), rtol=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margin"] == 0.0
    assert first["rewards/accuracy"] == 0.5
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    last = rows[-1]
    assert last["loss"] < 0.6 and last["rewards/accuracy"] > 0.9 and last["rewards/margin"] > 0, last
    assert last["eval/rewards/accuracy"] > 0.9 and last["eval/loss"] < 0.6, last


def test_precomputed_reference_matches_in_step(files, reference_run, tmp_path):
    dpo.train(tiny_config(files, num_steps=3, **{"mesh.data": 8, "dpo.reference": "precompute"}), str(tmp_path))
    for row, ref in zip(metrics.read_metrics(tmp_path), reference_run[0][:3]):
        for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
            np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _script_flags(files):
    """tiny_config(files) as command-line overrides (the mesh is left to the device count)."""
    data = {"data.train": files / "train.jsonl", "data.eval": files / "eval.jsonl",
            "data.tokenizer": files / "tokenizer", "data.cache_dir": files / "tfds"}
    return [f"--config.{k}={v}" for k, v in {**data, **FLAGS}.items()]


def test_sigterm_resume_is_exact_and_the_script_continues_on_one_device(files, reference_run, tmp_path,
                                                                         sigterm_after_step, script_env):
    """SIGTERM while step 4 is logged: step 5 is finished and checkpointed (8 devices). (a) The same
    call again equals the uninterrupted run exactly (metrics and parameters). (b) A copy of the step-5
    run dir is continued by the script on ONE device and ends where the 8-device reference ends."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    sigterm_after_step(4)
    first = dpo.train(tiny_config(files, **{"mesh.data": 8}), str(run))
    assert first.preempted and first.step == 5
    shutil.copytree(run, copy)
    second = dpo.train(tiny_config(files, **{"mesh.data": 8}), str(run))
    assert second.step == NUM_STEPS and not second.preempted
    rows, workdir = reference_run
    assert without_timings(metrics.read_metrics(run)) == without_timings(rows)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    _, resumed = loading.load_model(run, heads=("lm",), mesh=mesh)
    _, straight = loading.load_model(workdir, heads=("lm",), mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))

    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "train_dpo.py"), "--config",
                           str(REPO / "configs" / "dpo.py") + ":tiny", f"--workdir={copy}", *_script_flags(files)],
                          cwd=REPO, env=script_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"DPO finished at step {NUM_STEPS}" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:])
    got = metrics.read_metrics(copy)
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for row, ref in zip(got, rows):
        np.testing.assert_allclose([row["loss"], row["rewards/margin"], row["logps/chosen"]],
                                   [ref["loss"], ref["rewards/margin"], ref["logps/chosen"]], rtol=1e-4, atol=1e-5,
                                   err_msg=f"step {row['step']}")
    np.testing.assert_allclose(got[-1]["eval/loss"], rows[-1]["eval/loss"], rtol=1e-4)
    assert checkpoint.read_meta(copy)["stage"] == "dpo"


def test_simpo_runs_without_a_reference(files, tmp_path):
    """SimPO's step and evaluation programs take no reference parameters; its first-step implicit
    rewards are beta * mean log-prob (negative, nonzero margin), not 0 as with a reference. (IPO's
    length-averaged form is checked in test_dpo.py.)"""
    dpo.train(tiny_config(files, "simpo", num_steps=1, **{"mesh.data": 8}), str(tmp_path))
    first = metrics.read_metrics(tmp_path)[0]
    assert first["rewards/chosen"] < 0 and first["rewards/rejected"] < 0 and first["rewards/margin"] != 0.0
    assert first["loss"] > 0 and math.isfinite(first["eval/loss"])


def test_dpo_trains_on_the_hh_rlhf_sample(sample_data_dir, hh_tokenizer, tmp_path):
    hh_file = sample_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    config = dpo_configs.get_config("tiny")
    config.model.update(d_model=32, d_ff=64, n_heads=2, vocab_size=512)
    config.data.update(kind="hh", train=str(hh_file), eval="", tokenizer=str(hh_tokenizer), template="hh",
                       max_len=64, max_prompt_len=48, cache_dir=str(tmp_path / "tfds"))
    config.update(num_steps=3, batch_size=8, log_every=1, fast_compile=True)
    result = dpo.train(config, str(tmp_path / "run"))
    rows = metrics.read_metrics(tmp_path / "run")
    assert result.step == 3 and [r["step"] for r in rows] == [1, 2, 3]
    np.testing.assert_allclose(rows[0]["loss"], math.log(2.0), rtol=1e-6)  # policy = reference at step 1
    assert rows[-1]["rewards/margin"] != 0.0 and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("override, message", [
    ({"dpo.loss_type": "hinge"}, r"config.dpo.loss_type='hinge' \(allowed: 'sigmoid', 'ipo', 'simpo'\)"),
    ({"dpo.label_smoothing": 0.5}, r"config.dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    ({"dpo.reference": "cached"}, r"config.dpo.reference='cached' \(allowed: 'in_step', 'precompute'\)"),
    ({"data.kind": "demonstrations"}, r"config.data.kind='demonstrations' \(allowed: 'rankings'"),
])
def test_config_errors_name_the_key_before_any_compilation(files, tmp_path, override, message, monkeypatch):
    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    with pytest.raises(ValueError, match=message):
        dpo.train(tiny_config(files, **override), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_data_that_does_not_fit_is_one_line_naming_the_key_before_any_compilation(files, tmp_path, monkeypatch):
    """A batch larger than the training prompts (with config.num_steps set, too) and a tokenizer with more
    ids than the model's vocabulary: one line naming the key, the counts and the file, before any jit."""
    assert_one_line_errors_before_jit(lambda override, workdir: dpo.train(tiny_config(files, **override), workdir),
                                      ranking_data_that_does_not_fit(files), tmp_path, monkeypatch)


def test_a_reference_of_another_architecture_is_one_line_naming_the_key(files, tmp_path):
    """dpo.reference_path pointing at a checkpoint whose model differs from the policy's (here the
    vocabulary): one line naming the key and the fields that differ, not a shape error deep in a restore."""
    from rlhf_jax.models import Transformer, TransformerConfig, init_params

    other = Transformer(TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=32))
    saver = checkpoint.Checkpointer(tmp_path / "other" / "checkpoints")
    saver.save(1, {"params": jax.device_get(init_params(other, jax.random.PRNGKey(0)))},
               {"model": loading.model_meta(other), "stage": "sft"})
    saver.close()
    config = tiny_config(files, **{"dpo.reference_path": str(tmp_path / "other")})
    with pytest.raises(ValueError, match=r"^config.dpo.reference_path='.*/other' holds another architecture than the "
                                         r"policy: vocab_size=40 \(policy 120\)"):
        dpo.train(config, str(tmp_path / "run"))
