"""Pipeline: evaluation helpers, report outputs, stage bookkeeping, and the smoke run end to end."""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import pipeline as pipeline_configs
from rlhf_jax import evaluation, losses, pipeline, report, rl, tasks
from rlhf_jax.pipeline import compare
from rlhf_jax.tasks import tokenizer as task_tokenizer


# ----------------------------------------------------------------------------------------------
# evaluation: pure helpers
# ----------------------------------------------------------------------------------------------
def test_padded_chunks_cover_every_row_once_with_fixed_shape():
    chunks = evaluation.padded_chunks(5, 2)
    # 5 rows in chunks of 2: [0 1] [2 3] [4 0]; the trailing 0 is filler.
    assert [c.tolist() for c in chunks] == [[0, 1], [2, 3], [4, 0]]
    with pytest.raises(ValueError, match="num_rows"):
        evaluation.padded_chunks(0, 4)


def test_map_batched_drops_filler_rows_and_keeps_order():
    calls = []

    def fn(x):
        calls.append(x.shape)
        return {"double": 2 * x}

    out = evaluation.map_batched(fn, {"x": np.arange(7)}, batch_size=3)
    assert calls == [(3,), (3,), (3,)]  # one shape for every call
    np.testing.assert_array_equal(out["double"], 2 * np.arange(7))


def test_rm_heldout_accuracy_by_hand():
    # Prompt 1: ranks [0, 1, 2] (response 0 best); scores 3 > 2 > 1 agree on all 3 pairs -> 3/3.
    # Prompt 2: ranks [2, 0, 1]; the labeler's pairs: (1 over 0), (2 over 0), (1 over 2).
    #   scores [5, 5, 1]: (1 vs 0) tie -> 1/2, (2 over 0): 1 < 5 -> 0, (1 over 2): 5 > 1 -> 1.
    # Total (3 + 1.5) / 6 = 0.75.
    scores = np.array([[3.0, 2.0, 1.0], [5.0, 5.0, 1.0]])
    ranks = np.array([[0, 1, 2], [2, 0, 1]])
    assert float(losses.ranking_accuracy(scores, ranks)) == pytest.approx(0.75)
    assert pipeline.rm_heldout_accuracy(scores, ranks) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one shape"):
        pipeline.rm_heldout_accuracy(scores, ranks[:, :2])


def test_ranking_accuracy_with_ties_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(20, 4)).astype(float)  # many ties
    ranks = np.stack([rng.permutation(4) for _ in range(20)])
    total = 0.0
    for s, r in zip(scores, ranks):
        for i in range(4):
            for j in range(4):
                if r[i] < r[j]:
                    total += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    # K fixed and distinct ranks: every prompt has 6 pairs, so the per-prompt mean is the pooled one
    assert float(losses.ranking_accuracy(scores, ranks)) == pytest.approx(total / (20 * 6))


def test_sequence_kl_of_the_eval_sums_valid_tokens_only():
    policy = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    reference = np.array([[-1.5, -1.0, -7.0], [-1.0, -0.25, 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (third token masked); row 1: 0.5 - 0.25 - 9 = -8.75
    np.testing.assert_allclose(jnp.sum(rl.kl_k1(policy, reference, mask), axis=-1), [-0.5, -8.75])


def test_best_of_n_and_distinct_first():
    np.testing.assert_array_equal(evaluation.best_of_n_indices(np.array([[0.1, 0.9, 0.9], [2.0, 1.0, 0.0]])),
                                  [1, 0])  # first index on ties
    assert evaluation.distinct_first(["a", "a", "b", "c", "b"], 3) == [0, 2, 3]
    assert evaluation.distinct_first(["a", "a", "b"], 3) is None


def test_decode_responses_stops_at_eos_and_keeps_other_specials():
    tok = task_tokenizer.build_tokenizer()
    eos = tok.eos_token_id
    ids = tok("a c d", add_special_tokens=False)["input_ids"]
    user = tok.convert_tokens_to_ids("<user>")
    tokens = np.array([ids + [eos, 0], [ids[0], user, ids[1], ids[2], 0]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert evaluation.decode_responses(tok, tokens, mask, eos) == ["a c d", "a <user> c d <pad>"]


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _summary(**overrides):
    values = dict(sft_gold=0.4, best_of_4_gold=0.5, policy_gold=0.7, rm_heldout_accuracy=0.71,
                  labeler_agreement=0.74, kl_to_sft=3.2, win_rate_vs_sft=0.8, wall_seconds=100.0)
    values.update(overrides)
    return values


def test_write_summary_rejects_missing_and_nonfinite(tmp_path):
    path = tmp_path / "summary.json"
    report.write_summary(path, _summary())
    assert json.loads(path.read_text())["policy_gold"] == 0.7
    with pytest.raises(ValueError, match="kl_to_sft=nan"):
        report.write_summary(path, _summary(kl_to_sft=float("nan")))
    bad = _summary()
    del bad["win_rate_vs_sft"]
    with pytest.raises(ValueError, match="win_rate_vs_sft: missing"):
        report.write_summary(path, bad)


def test_the_report_says_what_kl_to_sft_estimates_and_what_a_negative_value_means(tmp_path):
    """kl_to_sft is the k1 estimate (a Monte-Carlo mean of log-ratios, which can come out below 0): the
    headline gives it with its standard error, a note names the estimator, and a negative value is
    explained as sampling noise, unless it is more than 3 standard errors below 0."""
    assert report.standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.0)
    assert report.standard_error([5.0]) == 0.0
    samples = [{"prompt": "p", "sft": "a", "sft_gold": 0.5, "ppo": "b", "ppo_gold": 0.6}]
    summary = _summary(kl_to_sft=-0.021, kl_to_sft_stderr=0.034, kl_to_sft_k3=0.012)
    report.write_report(tmp_path / "report.md", summary, samples, {})
    text = (tmp_path / "report.md").read_text()
    assert "at KL -0.02 ± 0.03 nats from SFT (sampled estimate)" in text
    assert "| kl_to_sft | -0.021 | KL(policy \\|\\| SFT), nats per response, sampled: " in text
    assert ("- kl_to_sft is a sampled estimate of KL(policy || SFT) in nats per response: the mean over held-out "
            "prompts of sum_t (log pi_policy - log pi_sft) on the policy's own samples (the k1 estimator, as the RL "
            "stage's `kl`). It is unbiased, but single terms can be negative; its standard error over prompts is "
            "0.034; the k3 estimate (r - 1 - log r per token, >= 0 by construction) is 0.012. The value here, "
            "-0.021, is below 0, which the true KL never is: a small negative estimate is sampling noise (the policy "
            "is too close to SFT for this many samples to tell the two apart).\n") in text
    far = report.kl_note(_summary(kl_to_sft=-0.5, kl_to_sft_stderr=0.01))
    assert far.endswith("The value here, -0.500, is 50.0 standard errors below 0, more than sampling noise explains: "
                        "check that the policy's samples and both log-probs used the same temperature.")
    assert "below 0" not in report.kl_note(_summary())  # 3.2: nothing to explain; older summaries have no stderr
    assert report.KL_TO_SFT_ESTIMATOR.startswith("k1: ")


def test_markdown_table_and_series():
    table = report.markdown_table([{"a": 1, "b": 0.123456}, {"a": "x|y"}], ("a", "b"))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x\\|y |  |"]
    rows = [{"step": 1, "kl": 0.5}, {"step": 2}, {"step": 3, "kl": float("nan")}, {"step": 4, "kl": 1.5}]
    assert report.series(rows, "kl") == ([1, 4], [0.5, 1.5])


def test_moving_average_by_hand():
    # window 2: [1], [1+3]/2, [3+5]/2, [5+7]/2
    assert report.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert report.moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    with pytest.raises(ValueError, match="window"):
        report.moving_average([1.0], 0)


def test_plots_and_report_files(tmp_path):
    ppo_rows = [{"step": s, "reward/mean": 0.1 * s, "kl": 0.2 * s, "kl_coef": 0.05} for s in range(1, 6)]
    assert report.plot_ppo_curves(ppo_rows, tmp_path / "ppo.png") == ["reward/mean", "kl", "kl_coef"]
    rm_rows = [{"step": 1, "accuracy": 0.6}, {"step": 2, "accuracy": 0.7, "eval/accuracy": 0.65}]
    assert report.plot_rm_accuracy(rm_rows, tmp_path / "rm.png", ceiling=0.74) == ["accuracy", "eval/accuracy"]
    sweep_rows = [{"kl_coef": c, "kl_to_sft": k, "policy_gold": g, "ppo_rm_score": r}
                  for c, k, g, r in ((0.2, 1.0, 0.5, 0.3), (0.01, 9.0, 0.4, 1.2), (0.05, 4.0, 0.6, 0.9))]
    report.plot_overoptimization(sweep_rows, tmp_path / "sweep.png", baseline=(0.0, 0.45, 0.0))
    for name in ("ppo.png", "rm.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [{"prompt": "sort : b a", "sft": "sure ! a b", "sft_gold": 0.8, "ppo": "a b", "ppo_gold": 1.0}]
    report.write_report(tmp_path / "report.md", _summary(), samples, {"PPO curves": "ppo.png"})
    text = (tmp_path / "report.md").read_text()
    assert "| sort : b a | sure ! a b (0.80) | a b (1.00) |" in text
    assert "![PPO curves](ppo.png)" in text and "| win_rate_vs_sft | 0.8 |" in text


# ----------------------------------------------------------------------------------------------
# pipeline bookkeeping
# ----------------------------------------------------------------------------------------------
def test_run_stage_runs_once_then_skips(tmp_path):
    calls = []
    first = pipeline.run_stage("demo", tmp_path / "demo", lambda: calls.append(1) or {"n": 3}, echo=lambda _: None)
    again = pipeline.run_stage("demo", tmp_path / "demo", lambda: calls.append(1) or {"n": 4}, echo=lambda _: None)
    assert calls == [1]
    assert first["info"] == again["info"] == {"n": 3}
    assert math.isfinite(first["seconds"]) and (tmp_path / "demo" / pipeline.DONE).exists()


def test_failed_stage_leaves_no_marker(tmp_path):
    def boom():
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        pipeline.run_stage("demo", tmp_path / "demo", boom, echo=lambda _: None)
    assert pipeline.stage_info(tmp_path / "demo") is None


def test_distinct_candidates_and_labels_sorted_at_zero_temperature():
    examples = tasks.sample_examples(2, seed=3)
    good = examples[0].answer
    texts = [[good, good, "sure ! " + good, "", "x"], ["a", "a", "a", "b", ""]]
    rows, chosen = pipeline.distinct_candidates(texts, 3)
    assert rows == [0] and chosen == [[good, "sure ! " + good, "x"]]
    records, gold_sets = pipeline.label_rankings([examples[0]], chosen, temperature=0.0, seed=0)
    # noise-free labeler: best gold first; the exact answer (gold 1) beats the chatty one (0.8).
    expected = np.argsort(-gold_sets[0], kind="stable").tolist()
    assert records[0]["ranking"] == expected and expected[0] == 0


def test_sweep_overrides_are_typed_and_checked():
    import ml_collections

    config = ml_collections.ConfigDict({"seed": 0, "ppo": {"num_steps": 10, "kl": {"coef": 0.05}},
                                        "sft": {"num_steps": 5}})
    assert pipeline.parse_override("ppo.kl.coef=0.2") == ("ppo.kl.coef", 0.2)
    assert pipeline.parse_override("ppo.name=abc") == ("ppo.name", "abc")  # not a literal: a string
    new = pipeline.apply_overrides(config, ["ppo.num_steps=200", "ppo.kl.coef=1"])
    assert (new.ppo.num_steps, new.ppo.kl.coef, config.ppo.num_steps) == (200, 1.0, 10)  # a copy, int -> float
    with pytest.raises(ValueError, match="no field 'epochs'"):
        pipeline.apply_overrides(config, ["ppo.epochs=2"])
    with pytest.raises(ValueError, match="reuses the finished 'sft' stage"):
        pipeline.apply_overrides(config, ["sft.num_steps=9"])
    with pytest.raises(ValueError, match="ppo.num_steps='many'"):
        pipeline.apply_overrides(config, ["ppo.num_steps=many"])
    with pytest.raises(ValueError, match="expected key=value"):
        pipeline.parse_override("ppo.num_steps")


def test_sweep_directory_names_say_what_was_overridden():
    from rlhf_jax.pipeline.sweep import sweep_name

    assert sweep_name([]) == "base"
    assert sweep_name(["ppo.ppo.epochs=4", "ppo.actor.optim.learning_rate=3e-4"]) == \
        "ppo.actor.optim.learning_rate=3e-4,ppo.ppo.epochs=4"  # sorted: the same set, the same directory
    odd = sweep_name(["ppo.rollout.eos_id=[1, 2]"])  # "[", " " cannot stay: replaced, and a hash keeps it unique
    assert odd.startswith("ppo.rollout.eos_id=_1,_2_-") and len(odd) == len("ppo.rollout.eos_id=_1,_2_-") + 8
    assert odd != sweep_name(["ppo.rollout.eos_id=[1 ,2]"])
    long = sweep_name([f"ppo.actor.optim.learning_rate={i}e-4" for i in range(5)])
    assert len(long) == 80 + 1 + 8


def test_eval_temperature_defaults_to_the_trained_policy():
    import ml_collections

    config = ml_collections.ConfigDict({"eval": {"temperature": -1.0}, "ppo": {"rollout": {"temperature": 0.5}}})
    assert pipeline.eval_temperature(config) == 0.5  # negative: the rollout temperature PPO trained at
    config.eval.temperature = 0.0
    assert pipeline.eval_temperature(config) == 0.0  # an explicit choice (greedy) is kept
    config.eval.temperature = 1.0
    assert pipeline.eval_temperature(config) == 1.0


# ----------------------------------------------------------------------------------------------
# The smoke pipeline end to end (a subprocess, one CPU device)
# ----------------------------------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]
TRAINED_STAGES = ("pretrain", "sft", "rm", "ppo")


def _run_pipeline(workdir, env, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "run_pipeline.py"), f"--workdir={workdir}",
                           f"--config={REPO / 'configs' / 'pipeline.py'}:smoke", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, script_env):
    workdir = tmp_path_factory.mktemp("pipeline")
    result = _run_pipeline(workdir, script_env(1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def test_smoke_pipeline_runs_every_stage(smoke_workdir):
    for stage in pipeline.STAGES:
        assert pipeline.stage_info(smoke_workdir / stage) is not None, f"stage {stage} has no DONE marker"
    for stage in TRAINED_STAGES:
        steps = [p.name for p in (smoke_workdir / stage / "checkpoints").iterdir() if p.name.isdigit()]
        record = pipeline.stage_info(smoke_workdir / stage)
        assert str(record["info"]["step"]) in steps, f"{stage}: final step {record['info']['step']} not in {steps}"
    for name in ("sft.jsonl", "corpus.txt", "gold.jsonl", "heldout_prompts.jsonl", "tokenizer/tokenizer.json"):
        assert (smoke_workdir / "task" / name).exists(), name
    for name in ("rankings_train.jsonl", "rankings_heldout.jsonl"):
        assert (smoke_workdir / "rankings" / name).stat().st_size > 0, name


def test_smoke_summary_report_and_plots(smoke_workdir):
    summary = json.loads((smoke_workdir / "summary.json").read_text())
    for key in report.SUMMARY_KEYS:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), key
    for key in ("sft_gold", "best_of_4_gold", "ppo_gold", "policy_gold", "rm_heldout_accuracy", "labeler_agreement",
                "win_rate_vs_sft"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["wall_seconds"] > 0
    # what it ran on (the subprocess had 1 fake CPU device): versions and machine, also in config.json
    import jaxlib

    assert summary["environment"]["versions"]["jaxlib"] == jaxlib.__version__
    assert summary["environment"]["device_count"] == 1 and summary["environment"]["backend"] == "cpu"
    assert json.loads((smoke_workdir / "sft" / "config.json").read_text())["environment"]["device_count"] == 1
    # best-of-4 picks one of the 4 SFT samples: its gold is between the worst and the best of them.
    samples = [json.loads(line) for line in (smoke_workdir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == summary["num_prompts"]
    assert np.mean([min(s["sft_gold"]) for s in samples]) <= summary["best_of_4_gold"] + 1e-9
    assert summary["best_of_4_gold"] <= np.mean([max(s["sft_gold"]) for s in samples]) + 1e-9
    assert summary["sft_gold"] == pytest.approx(np.mean([s["sft_gold"] for s in samples]))
    assert summary["ppo_gold"] == summary["policy_gold"] == pytest.approx(np.mean([s["ppo_gold"] for s in samples]))
    assert summary["algorithm"] == "ppo"
    # kl_to_sft: the k1 mean over prompts of the samples' sequence KLs, with its standard error and the k3 mean
    per_prompt = [np.mean(s["kl"]) for s in samples]
    assert summary["kl_to_sft"] == pytest.approx(np.mean(per_prompt))
    assert summary["kl_to_sft_stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt)))
    assert summary["kl_to_sft_k3"] >= 0.0 and summary["kl_to_sft_estimator"] == report.KL_TO_SFT_ESTIMATOR
    text = (smoke_workdir / "report.md").read_text()
    assert report.kl_note(summary) in text
    for key in report.SUMMARY_KEYS:
        assert f"| {key} |" in text
    for png in ("ppo_curves.png", "rm_accuracy.png"):
        assert (smoke_workdir / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text
    ppo_rows = [json.loads(line) for line in (smoke_workdir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["gold/mean"]) for row in ppo_rows)


def test_smoke_rerun_skips_finished_stages(smoke_workdir, script_env):
    before = (smoke_workdir / "summary.json").read_text()
    result = _run_pipeline(smoke_workdir, script_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in pipeline.STAGES:
        assert f"[{stage}] done already" in result.stdout
    assert "running" not in result.stdout
    assert (smoke_workdir / "summary.json").read_text() == before


def test_another_algorithm_reuses_the_stages_and_writes_its_own_directory(smoke_workdir, script_env):
    """--config.algorithm=grpo on a finished workdir: task .. rm are skipped, the RL stage and the
    evaluation run into DIR/grpo/ (its summary names the algorithm; PPO's summary is untouched)."""
    before = (smoke_workdir / "summary.json").read_text()
    result = _run_pipeline(smoke_workdir, script_env(1), "--config.algorithm=grpo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("task", "pretrain", "sft", "rankings", "rm"):
        assert f"[{stage}] done already" in result.stdout
    assert f"[grpo] running in {smoke_workdir / 'grpo' / 'rl'}" in result.stdout
    summary = json.loads((smoke_workdir / "grpo" / "summary.json").read_text())
    assert summary["algorithm"] == "grpo" and "ppo_gold" not in summary
    samples = [json.loads(line) for line in (smoke_workdir / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert summary["policy_gold"] == pytest.approx(np.mean([s["ppo_gold"] for s in samples]))
    assert (smoke_workdir / "summary.json").read_text() == before
    rows = [json.loads(line) for line in (smoke_workdir / "grpo" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("group/zero_std_fraction" in row and "value/loss" not in row for row in rows)
    assert json.loads((smoke_workdir / "grpo" / "rl" / "config.json").read_text())["algorithm"]["name"] == "grpo"
    assert f"Report: {smoke_workdir / 'grpo' / 'report.md'}" in result.stdout
    assert "| GRPO response |" in (smoke_workdir / "grpo" / "report.md").read_text()

    # DIR/grpo is that algorithm's run, not a pipeline: pointed at it, the pipeline stops in one line
    listing = sorted(p.name for p in (smoke_workdir / "grpo").iterdir())
    wrong = _run_pipeline(smoke_workdir / "grpo", script_env(1))
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1].startswith(f"FATAL WorkdirError: --workdir {smoke_workdir / 'grpo'} "
                                                            "holds one RL algorithm's run inside a pipeline")
    assert sorted(p.name for p in (smoke_workdir / "grpo").iterdir()) == listing
    # an unknown algorithm is refused before any stage runs, naming the key
    bad = _run_pipeline(smoke_workdir, script_env(1), "--config.algorithm=grpoo")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("FATAL config error: config.algorithm='grpoo' (allowed: 'ppo'")
    assert not (smoke_workdir / "grpoo").exists()


def test_dpo_variants_route_to_their_own_directories_and_train_on_the_rankings(tmp_path):
    """The DPO variants are not RL algorithms: DIR/<variant>/{dpo, eval}; their stage config trains
    from SFT on the rankings stage's files, the variant picking the loss (no training here)."""
    layout = pipeline.Layout(tmp_path)
    assert pipeline.run.policy_dirs(layout, "ipo") == (tmp_path / "ipo" / "dpo", tmp_path / "ipo" / "eval",
                                                       tmp_path / "ipo")
    assert pipeline.run.policy_dirs(layout, "grpo")[0] == tmp_path / "grpo" / "rl"
    config = pipeline_configs.get_config("smoke")
    config.algorithm = "ipo"
    dpo = pipeline.stage_configs(config, layout)["dpo"]
    assert dpo.variant == "ipo" and dpo.init.path == str(tmp_path / "sft")
    assert (dpo.data.train, dpo.data.eval) == (layout.rankings_train, layout.rankings_heldout)
    from rlhf_jax import preference

    settings = preference.resolve_variant(dpo.dpo, dpo.variant)
    assert settings == {"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0, "gamma": 0.5, "online": False}
    assert preference.resolve_variant(dpo.dpo, "simpo")["beta"] == 2.0
    assert preference.resolve_variant(dpo.dpo, "cdpo")["label_smoothing"] == 0.1
    pipeline.run.check_algorithm("online_dpo")
    with pytest.raises(ValueError, match="config.algorithm='dpoo'"):
        pipeline.run.check_algorithm("dpoo")


def test_online_dpo_runs_its_rounds_and_evaluates_the_last_policy(smoke_workdir, script_env):
    """--config.algorithm=online_dpo on the finished smoke workdir: 2 rounds (sampling from the previous
    round's policy, RM ranking, a DPO run with SFT as reference) into DIR/online_dpo/dpo/round<r>, then
    the eval stage samples the last round's policy; the shared stages and PPO's summary are untouched."""
    from rlhf_jax import loading

    before = (smoke_workdir / "summary.json").read_text()
    result = _run_pipeline(smoke_workdir, script_env(1), "--config.algorithm=online_dpo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("task", "pretrain", "sft", "rankings", "rm"):
        assert f"[{stage}] done already" in result.stdout
    summary = json.loads((smoke_workdir / "online_dpo" / "summary.json").read_text())
    assert summary["algorithm"] == "online_dpo" and 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    samples = [json.loads(line) for line in (smoke_workdir / "online_dpo" / "samples.jsonl").read_text().splitlines()]
    assert summary["policy_gold"] == pytest.approx(np.mean([s["ppo_gold"] for s in samples]))
    assert (smoke_workdir / "online_dpo" / "dpo_accuracy.png").exists()
    rows = [json.loads(line) for line in
            (smoke_workdir / "online_dpo" / "dpo" / "round0" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-6) and "eval/rewards/accuracy" in rows[-1]
    done = pipeline.stage_info(smoke_workdir / "online_dpo" / "dpo")["info"]
    assert len(done["rounds"]) == 2 and done["policy_dir"].endswith("round1/dpo")
    round1 = json.loads((smoke_workdir / "online_dpo" / "dpo" / "round1" / "dpo" / "config.json").read_text())
    assert round1["init"]["path"].endswith("round0/dpo") and round1["dpo"]["reference_path"].endswith("/sft")
    # the evaluated policy is the last round's parameters, not SFT's
    _, last = loading.load_model(smoke_workdir / "online_dpo" / "dpo" / done["policy_dir"], heads=("lm",))
    _, sft = loading.load_model(smoke_workdir / "sft", heads=("lm",))
    assert not np.allclose(np.asarray(last["lm_head"]["kernel"]), np.asarray(sft["lm_head"]["kernel"]))
    assert (smoke_workdir / "summary.json").read_text() == before


def test_comparison_table_from_finished_runs(smoke_workdir, tmp_path):
    """compare_algorithms over the finished ppo, grpo and online_dpo runs of the smoke workdir (copied
    as seed 0; online_dpo's test ran before this one): nothing is retrained; the CSV rows are the runs'
    summaries and the table their mean / spread; online DPO (rounds, no per-step gold curve) is listed."""
    shutil.copytree(smoke_workdir, tmp_path / "seed0")
    config = pipeline_configs.get_config("smoke")
    result = compare.run_comparison(config, tmp_path, ["ppo", "grpo", "online_dpo"], [0], echo=lambda _: None)
    assert "online_dpo: 2 rounds x 16 prompts" in (tmp_path / "comparison.md").read_text()
    for name in ("ppo", "grpo", "online_dpo"):
        summary = json.loads((tmp_path / "seed0" / ("" if name == "ppo" else name) / "summary.json").read_text())
        run = next(r for r in result.runs if r["algorithm"] == name)
        assert run["policy_gold"] == summary["policy_gold"] and run["kl_to_sft"] == summary["kl_to_sft"]
        row = next(r for r in result.rows if r["algorithm"] == name)
        assert row["seeds"] == 1 and row["policy_gold mean"] == summary["policy_gold"]
        assert row["policy_gold spread"] == 0.0
    assert (tmp_path / "comparison.md").read_text().count("| ppo |") == 1
    for png in ("gold_vs_samples.png", "gold_vs_kl.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"--algorithms: unknown \['ppo2'\]"):
        compare.check_algorithms(["ppo2"])


def test_comparison_aggregates_mean_and_half_range():
    runs = [{"algorithm": "a", **{c: v for c in compare.COLUMNS}} for v in (1.0, 3.0, 2.0)]
    row = compare.aggregate_runs(runs, ["a"])[0]
    assert row["seeds"] == 3 and row["policy_gold mean"] == 2.0 and row["policy_gold spread"] == 1.0
