"""A newcomer's path (issue 20): README's bring-your-own-data walk-through and load/export snippet
run as written, the tokenizer it trains, the CLI's printed output, the logging integrations."""
import glob
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from rlhf_jax import bpe, cli, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
HH = "experiments/data/hh-rlhf/harmless-base-test.jsonl.gz"
ABSL_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")  # absl's INFO/WARNING/ERROR prefix


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def script(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


def fatal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("FATAL")]


# ----------------------------------------------------------------------------------------------
# The walk-through, as written in README (a few steps per stage)
# ----------------------------------------------------------------------------------------------
FEW_STEPS = {"train_sft.py": " --config.num_steps=3 --config.eval.num_batches=1 --config.fast_compile=True",
             "train_rm.py": " --config.num_steps=3 --config.fast_compile=True",
             "train_ppo.py": " --config.num_steps=2 --config.fast_compile=True",
             "train_tokenizer.py": " --vocab_size=600"}


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, script_env):
    """Run README's "Your own data" block with bash: python = this interpreter, runs/ = a temp dir,
    a few steps per stage (flags appended to each command, so absl takes the last value)."""
    root = tmp_path_factory.mktemp("newcomer")
    commands = readme_block("## Your own data, step by step", "bash").replace("\\\n", " ")
    lines = []
    for line in commands.splitlines():
        line = line.replace("runs/", f"{root}/runs/")
        if line.startswith("python "):
            line = f"{sys.executable} " + line[len("python "):]
            name = next((n for n in FEW_STEPS if f"experiments/{n}" in line), None)
            line += FEW_STEPS[name] if name else ""
        lines.append(line)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=script_env(1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / "hh", proc


def test_readme_walkthrough_runs_every_stage_quietly(walkthrough):
    """Tokenizer -> SFT -> RM -> PPO -> export on the vendored HH sample: every stage finishes, the RL
    workdir keeps its tokenizer, nothing but progress bars and results is printed (no absl/Orbax
    log lines, no read-only warnings on the stage hand-offs, no tracebacks)."""
    runs, proc = walkthrough
    out = proc.stdout + proc.stderr.replace("\r", "\n")
    for line in ("SFT finished at step 3", "RM finished at step 3", "PPO finished at step 2",
                 f"Exported policy {runs}/ppo (step 2)", f"Exported reward model {runs}/rm (step 3)"):
        assert line in out, line
    assert not [line for line in out.splitlines() if ABSL_LOG_LINE.match(line)], out[-3000:]
    assert "Traceback" not in out and "read only" not in out
    assert (runs / "ppo" / "tokenizer" / "tokenizer.json").is_file()
    assert sum(1 for _ in open(runs / "prompts.jsonl")) == 2312
    # the RL stage shows rollout responses as TensorBoard text
    texts = [v.tensor.string_val[0].decode() for _, v in tensorboard_values(runs / "ppo") if v.tag.startswith("samples")]
    assert len(texts) == 2 and texts[0].count("**response**") == 2


def tensorboard_values(workdir):
    """(step, summary value) of every event in WORKDIR/tensorboard (TFRecord framing, no tensorboard)."""
    from tensorboardX.proto import event_pb2

    for path in glob.glob(str(pathlib.Path(workdir) / "tensorboard" / "*")):
        data, i = pathlib.Path(path).read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            yield from ((event.step, value) for value in event.summary.value)


def test_readme_load_snippet_runs_and_exported_rm_scores_like_ours(walkthrough):
    """README's "Using a run in your own code" block runs as written (from the dir holding runs/);
    what it loads is the run's (the tokenizer has the trained vocabulary, the plain-Orbax restore
    equals rlhf_jax.load's params), and the exported RM scores the HH rows like ours."""
    import jax
    import torch
    import transformers

    import rlhf_jax
    from rlhf_jax.models import reward

    runs, _ = walkthrough
    namespace = {}
    cwd = os.getcwd()
    os.chdir(runs.parent.parent)
    try:
        exec(readme_block("## Using a run in your own code", "python"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert len(namespace["tokenizer"]) == 600 and namespace["model"].heads == ("lm",)
    assert namespace["logits"].shape == (1, namespace["batch"]["input_ids"].shape[1], 600)
    assert namespace["rm"].heads == ("value",) and set(namespace["norm"]) >= {"mean", "std"}
    _, sft_params = rlhf_jax.load(runs / "sft")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(namespace["saved"].params), jax.device_get(sft_params))
    assert namespace["saved"].meta["stage"] == "sft"
    policy = namespace["policy"]  # the exported PPO policy (a Llama-family tiny model), with our eos / pad ids
    assert type(policy).__name__ == "LlamaForCausalLM"
    assert (policy.generation_config.eos_token_id, policy.generation_config.pad_token_id) == (1, 0)

    # the exported RM: right-padded HH dialogues score the same in transformers as with our RM
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(runs / "hf_rm"))
    texts = ["\n\nHuman: how do I bake bread?\n\nAssistant: flour, water, salt, yeast.", "\n\nHuman: hi\n\nAssistant: hello"]
    rows = [hf_tokenizer(t)["input_ids"] + [hf_tokenizer.eos_token_id] for t in texts]
    length = max(map(len, rows))
    ids = np.array([r + [hf_tokenizer.pad_token_id] * (length - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    rm, rm_params, _ = rlhf_jax.load_reward_model(runs / "rm")
    ours = np.asarray(reward.raw_scores(rm, rm_params, ids, mask))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(runs / "hf_rm")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------
def test_bpe_tokenizer_encodes_everything_and_keeps_special_tokens_whole(tmp_path, sample_data_dir):
    """Trained on the HH sample: any text (unseen words, accents, emoji) decodes back exactly with no
    unknown token; pad 0 / EOS 1 and the role headers are single tokens; it reloads offline."""
    import rlhf_jax

    tokenizer = bpe.train_tokenizer_files([str(sample_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz")],
                                          tmp_path / "tok", kind="hh", vocab_size=500)
    assert len(tokenizer) == 500 and (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    reloaded = rlhf_jax.load_tokenizer(tmp_path / "tok")
    text = "Zyxwvut naïve café — 😀 ∑ 北京\n\nHuman: hi"
    ids = reloaded(text)["input_ids"]
    assert reloaded.decode(ids) == text and reloaded.unk_token_id is None
    assert reloaded("<|user|>\nhi<|endoftext|>")["input_ids"][0] == reloaded.convert_tokens_to_ids("<|user|>")
    assert reloaded("x<|endoftext|>")["input_ids"][-1] == 1
    # frequent HH words are single tokens: the merges were learned from the file
    assert len(reloaded(" the")["input_ids"]) == 1 and len(reloaded(" you")["input_ids"]) == 1


def test_train_tokenizer_refuses_a_non_empty_out_in_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    proc = script("experiments/train_tokenizer.py", f"--files={HH}", "--kind=hh", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert fatal_lines(proc.stderr) == [f"FATAL ExportError: --out {tmp_path / 'out'} is not empty (files not written "
                                        "by an export of this run); nothing was written: give a new or empty directory"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


# ----------------------------------------------------------------------------------------------
# The CLI, on its printed output
# ----------------------------------------------------------------------------------------------
def test_unknown_key_is_the_same_line_with_or_without_a_config_preset(tmp_path):
    expected = ("FATAL Flags parsing error: unknown config key 'lerning_rate' in --config.optim.lerning_rate "
                "(config.optim has no field 'lerning_rate'; did you mean 'learning_rate'?)")
    for preset in ([], ["--config", "configs/rm.py:tiny"], ["--config=configs/rm.py:tiny"]):
        proc = script("experiments/train_rm.py", *preset, f"--workdir={tmp_path}/rm", "--config.optim.lerning_rate=1")
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [expected], (preset, proc.stderr[-2000:])


def test_help_shows_the_config_flags_and_keeps_usage_line_continuations():
    proc = script("experiments/train_sft.py", "--help")  # absl exits with status 1 after --help
    for flag in ("--config:", "--[no]config_help:", "--[no]traceback:", "--workdir:"):
        assert flag in proc.stdout, flag
    assert "--workdir runs/sft_gpt2 \\\n        --config.init.path=/path/to/gpt2" in proc.stdout


def test_config_help_lists_every_field_with_its_value_and_comment():
    """Every leaf of the preset (an independent walk of get_config) is printed once with its value
    and a comment; a few comments checked against configs/*.py by hand."""
    proc = script("experiments/train_ppo.py", "--config", "configs/ppo.py:tiny,grpo", "--config_help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "Fields of --config=configs/ppo.py:tiny,grpo (set any with --config.<key>=<value>):"
    sys.path.insert(0, str(REPO))
    from configs import ppo

    def leaves(node, prefix=""):
        for key in node.keys():
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict) and len(value.keys()):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    expected = dict(leaves(ppo.get_config("tiny,grpo")))
    printed = {line.split(" = ")[0]: line for line in lines[1:]}
    assert set(printed) == set(expected)
    assert all("  # " in line for line in printed.values()), [l for l in printed.values() if "  # " not in l]
    assert printed["algorithm.name"].startswith("algorithm.name = 'grpo'  # ")
    assert printed["num_steps"].endswith("# PPO iterations (rollout + update) to run in total")
    assert printed["actor.optim.b2"] == "actor.optim.b2 = 0.95  # Adam beta2"
    assert printed["rewards.rules.missing_eos.weight"].endswith("# −weight when the response has no stop token "
                                                                "(rollout.eos_id)")
    assert printed["rollout.eos_id"] == "rollout.eos_id = 1  # stop token id or a list of them; -1 = none"
    assert printed["wandb.mode"].startswith("wandb.mode = 'offline'  # \"offline\": files under WORKDIR/wandb")


def test_a_data_error_is_one_line_and_traceback_shows_it(tmp_path):
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "respons": "d"}\n')
    bpe.train_bpe(["a b c d"], vocab_size=300).save_pretrained(str(tmp_path / "tok"))
    args = ["experiments/train_sft.py", f"--workdir={tmp_path}/sft", f"--config.data.train={bad}",
            f"--config.data.tokenizer={tmp_path / 'tok'}"]
    proc = script(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert fatal_lines(proc.stderr) == [f"FATAL DataError: {bad}, line 2, field 'response': missing field"]
    proc = script(*args, "--traceback")
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"rlhf_jax.data.formats.DataError: {bad}, line 2, field "
                                                    "'response': missing field")


# ----------------------------------------------------------------------------------------------
# Weights & Biases (a stand-in module records the calls; wandb itself is optional)
# ----------------------------------------------------------------------------------------------
def test_wandb_logging_starts_offline_with_the_run_id_and_logs_every_row(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(),
                                 Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "run.json").write_text(json.dumps({"stage": "sft", "run_id": "abc123"}))
    config = ml_collections.ConfigDict({"seed": 3, "wandb": {"enabled": True, "mode": "offline", "project": "p",
                                                             "name": ""}})
    writer = metrics.MetricWriter(tmp_path)
    writer.start_wandb(config)
    writer.write(5, {"loss": 0.5, "kl": float("nan")})
    writer.write_text(5, "samples", "**prompt** x")
    writer.close()
    assert calls == [
        ("init", {"project": "p", "name": tmp_path.name, "dir": str(tmp_path), "mode": "offline", "id": "abc123",
                  "resume": "allow", "config": config.to_dict()}),
        ("log", {"loss": 0.5}, 5),
        ("log", {"samples": ("table", ["step", "text"], [[5, "**prompt** x"]])}, 5),
        ("finish",)]
    assert [v.tensor.string_val[0] for _, v in tensorboard_values(tmp_path) if v.tag.startswith("samples")] == [
        b"**prompt** x"]

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: one line naming the key
    with pytest.raises(ValueError, match=r"^config.wandb.enabled=True but the wandb package is not installed"):
        metrics.MetricWriter(tmp_path / "other").start_wandb(config)
    disabled = ml_collections.ConfigDict({"wandb": {"enabled": False, "mode": "offline", "project": "p", "name": ""}})
    metrics.MetricWriter(tmp_path / "off").start_wandb(disabled)  # off: wandb is never imported


def test_missing_wandb_stops_a_script_before_training_starts(monkeypatch, capsys):
    """config.wandb.enabled without the package: one FATAL line before data loading or compiling
    (the train function is never called), naming the pipeline stage's key."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = ml_collections.ConfigDict({"wandb": {"enabled": True, "mode": "offline", "project": "p", "name": ""}})
    called = []
    with pytest.raises(SystemExit) as stop:
        cli.run_trainer(["train_sft.py"], lambda *args: called.append(args), config, "/nonexistent", "SFT", ())
    assert stop.value.code == 1 and not called
    assert capsys.readouterr().err == ("FATAL config error: config.wandb.enabled=True but the wandb package is not "
                                       "installed: pip install wandb (or --config.wandb.enabled=False)\n")
    with pytest.raises(ValueError, match=r"^config.sft.wandb.enabled=True .* \(or --config.sft.wandb.enabled=False\)"):
        metrics.check_wandb(config, "config.sft")


def test_config_help_covers_the_pipeline_with_each_stages_own_comments():
    """The pipeline nests the stage configs: their fields carry the stage file's comments."""
    text = cli.describe_config(cli.load_config_file(str(REPO / "configs" / "pipeline.py")), REPO / "configs" / "pipeline.py")
    lines = dict(line.split(" = ", 1) for line in text.splitlines())
    assert lines["rm.data.kind"].endswith('# "rankings" (K responses + ranking), "comparisons" (chosen/rejected), "hh"')
    assert "rlhf_jax.data kind" in lines["sft.data.kind"]
    assert lines["ppo.num_steps"].endswith("# PPO iterations (rollout + update) to run in total")
    assert lines["pretrain.num_steps"].endswith("# optimizer updates in the whole run (a resumed run continues up to it)")


def test_export_hf_errors_are_one_line(tmp_path):
    """A --workdir without checkpoints: one FATAL line naming it, nothing written."""
    proc = script("experiments/export_hf.py", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert fatal_lines(proc.stderr) == [f"FATAL FileNotFoundError: checkpoint path {tmp_path / 'none'} does not exist"]
    assert not (tmp_path / "out").exists()
