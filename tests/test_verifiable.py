"""Verifiable rewards: GSM8K-format answers and pass@k, the arithmetic task, the GSM8K reader, host
reward functions (loading, errors), and the host-reward RL iteration (values reach the advantages,
1 vs 8 devices, exact resume)."""
from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from configs import ppo as ppo_configs
from rlhf_jax import algorithms, host_rewards, loading, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.data import formats, prompt_fields
from rlhf_jax.tasks import answers, arithmetic

from conftest import multiprocess_test
from reward_functions import needs_gold, raises_on_seven, reads_gold_from_fields, words_equal_to_answer

REPO = pathlib.Path(__file__).resolve().parents[1]
GSM8K_SAMPLE = REPO / "experiments" / "data" / "gsm8k" / "sample.jsonl"
pytestmark = pytest.mark.usefixtures("compilation_cache")  # the trainer runs below share compiled programs


# ----------------------------------------------------------------------------------------------
# Answers, grading, pass@k
# ----------------------------------------------------------------------------------------------
def test_final_answer_and_exact_match_by_hand():
    assert answers.final_answer("3 + 4 = 7 . #### 7") == "7"
    assert answers.final_answer("so #### 1,234.") == "1234"
    assert answers.final_answer("#### $5") == "5"
    assert answers.final_answer("a #### 1 then #### 2") == "2"  # the last marker counts
    assert answers.final_answer("no marker 7") is None and answers.final_answer("####  ") is None
    responses = ["1 + 1 = 2 . #### 2", "#### 2.0", "#### 3", "2", "#### two"]
    assert answers.exact_match([""] * 5, responses, answer=["2"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert answers.exact_match(["q"], ["#### two"], answer=["two"]) == [1.0]  # non-numbers compare as strings
    assert answers.answer_format([""] * 4, ["x #### 5", "#### 5 6", "5", "#### 5 ."]) == [1.0, 0.0, 0.0, 0.0]


def test_pass_at_k_hand_computed():
    # n = 4 samples, c = 1 correct: pass@1 = 1/4; pass@2 = 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert answers.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert answers.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n = 5, c = 2, k = 3: 1 − C(3,3)/C(5,3) = 1 − 1/10
    assert answers.pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert answers.pass_at_k(5, 0, 3) == 0.0 and answers.pass_at_k(5, 3, 3) == 1.0
    for n, c, k in [(10, 3, 1), (10, 3, 4), (20, 7, 10), (8, 8, 8)]:  # against the binomial form
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert answers.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert answers.mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert answers.mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        answers.pass_at_k(4, 1, 5)


# ----------------------------------------------------------------------------------------------
# The arithmetic task
# ----------------------------------------------------------------------------------------------
def _evaluate_solution(solution: str) -> tuple[bool, int]:
    """Check every step "a op b = c ." of a worked solution with Python arithmetic; (all right, final)."""
    body, final = solution.split(" #### ")
    ok = True
    for step in body.split(" . "):
        lhs, rhs = step.rstrip(" .").split(" = ")
        a, op, b = lhs.split()
        ok &= (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(rhs)
    return ok and int(rhs) == int(final), int(final)


def test_arithmetic_problems_are_graded_exactly_and_splits_are_disjoint():
    train = arithmetic.sample_problems(200, seed=3, num_ops=(1, 3), max_value=15)
    heldout = arithmetic.sample_problems(50, seed=3, split="heldout", num_ops=(1, 3), max_value=15)
    assert not {p.question for p in train} & {p.question for p in heldout}
    for p in train:
        ok, final = _evaluate_solution(p.solution)
        assert ok and final == p.answer, p
        numbers = [int(w) for w in (p.question + " " + p.solution).split() if w.isdigit()]
        assert 0 <= min(numbers) and max(numbers) <= 15
        assert 1 <= p.solution.count("=") <= 3
        assert answers.exact_match([p.question], [p.solution], answer=[str(p.answer)]) == [1.0]
    rng = np.random.default_rng(0)
    wrong = [arithmetic.demonstration(p, rng, error_rate=1.0, max_value=15) for p in train[:50]]
    assert answers.exact_match([""] * 50, wrong, answer=[str(p.answer) for p in train[:50]]) == [0.0] * 50
    assert answers.answer_format([""] * 50, wrong) == [1.0] * 50


def test_arithmetic_export_is_gsm8k_format_and_tokenizes_exactly(tmp_path):
    from transformers import AutoTokenizer

    paths = arithmetic.export_arithmetic(tmp_path, n_sft=20, n_sft_eval=4, n_rl=8, n_heldout=6, n_corpus=5,
                                         max_value=12, error_rate=0.5)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    rows = prompt_fields.read_prompt_rows(paths["heldout"])
    assert len(rows) == 6
    for line in open(paths["heldout"]):
        record = json.loads(line)
        text = f"{record['question']} {record['answer']}"
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # one word per token, no <unk>
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    demos = list(formats.read_chat_records("demonstrations", paths["sft"]))
    assert len(demos) == 20 and all(d["responses"][0].split()[-2] == "####" for d in demos)


# ----------------------------------------------------------------------------------------------
# GSM8K-format files
# ----------------------------------------------------------------------------------------------
def test_gsm8k_reader_on_the_sample(tmp_path):
    rows = prompt_fields.read_prompt_rows(str(GSM8K_SAMPLE))
    lines = [json.loads(line) for line in open(GSM8K_SAMPLE)]
    assert len(rows) == len(lines) == 5
    assert rows.prompts == [r["question"] for r in lines]
    assert rows.fields["answer"] == ["18", "3", "70000", "540", "20"]  # by hand from the sample's "#### " lines
    assert rows.fields["solution"] == [r["answer"] for r in lines]
    prompts, fields = rows.take([4, 0])
    assert prompts == [lines[4]["question"], lines[0]["question"]] and fields["answer"] == ["20", "18"]
    # the same file is a prompts file and a demonstrations file for the data package
    as_prompts = list(formats.read_chat_records("prompts", str(GSM8K_SAMPLE)))
    assert [r["messages"] for r in as_prompts] == [[{"role": "user", "content": r["question"]}] for r in lines]
    as_demos = list(formats.read_chat_records("demonstrations", str(GSM8K_SAMPLE)))
    assert [r["responses"][0] for r in as_demos] == [r["answer"] for r in lines]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(formats.DataError, match=r"bad.jsonl, line 1, field 'answer': .*'#### <answer>'"):
        prompt_fields.read_prompt_rows(str(bad))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(formats.DataError, match=r"mixed.jsonl, line 2, field 'answer': .*same fields"):
        prompt_fields.read_prompt_rows(str(mixed))


# ----------------------------------------------------------------------------------------------
# Host reward functions: loading and errors
# ----------------------------------------------------------------------------------------------
def test_reward_function_specs_and_load_errors(tmp_path):
    fns = host_rewards.load_functions("rlhf_jax.tasks.answers:exact_match, rlhf_jax.tasks.answers:answer_format=0.1")
    assert [(f.name, f.weight) for f in fns] == [("exact_match", 1.0), ("answer_format", 0.1)]
    user = tmp_path / "my_rewards.py"
    user.write_text("def brevity(prompts, responses):\n    return [-len(r) for r in responses]\n")
    (fn,) = host_rewards.load_functions(f"{user}:brevity=2")
    assert fn.weight == 2.0 and fn.fn([""], ["abc"]) == [-3]
    for text, message in [("nocolon", "is not 'module.path:function"),
                          ("rlhf_jax.tasks.answers:exact_match=x", "weight 'x' is not a number"),
                          ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz' .ModuleNotFoundError"),
                          ("rlhf_jax.tasks.answers:nope", "has no function 'nope'"),
                          ("rlhf_jax.tasks.answers:exact_match,rlhf_jax.tasks.answers:exact_match", "two functions")]:
        with pytest.raises(host_rewards.RewardFunctionError, match=r"^config.rewards.functions: .*" + message):
            host_rewards.load_functions(text)


def _function(fn, name="f"):
    return host_rewards.RewardFunction(name=name, spec=f"tests:{name}", weight=1.0, fn=fn)


def test_bad_reward_functions_name_the_function_the_prompt_index_and_the_value():
    prompts, responses, index = ["p0", "p1", "p2"], ["a 1", "b 7", "c"], np.array([10, 11, 12])
    call = lambda fn, name: host_rewards.call_function(_function(fn, name), prompts, responses, {}, index)  # noqa
    message = r"reward function tests:boom raised KeyError: 'seven' on prompt index 11 \(response 'b 7'\)"
    with pytest.raises(host_rewards.RewardFunctionError, match=message):
        call(raises_on_seven, "boom")
    with pytest.raises(host_rewards.RewardFunctionError, match=r"tests:short returned 2 values for 3 responses"):
        call(lambda p, r: [0.0, 1.0], "short")
    with pytest.raises(host_rewards.RewardFunctionError, match=r"tests:text returned 'x' \(str\) for prompt index 12"):
        call(lambda p, r: [0.0, 1.0, "x"], "text")
    with pytest.raises(host_rewards.RewardFunctionError, match=r"tests:nan returned nan for prompt index 10: .*finite"):
        call(lambda p, r: [float("nan"), 0.0, 0.0], "nan")
    with pytest.raises(host_rewards.RewardFunctionError, match=r"tests:scalar returned float, expected a list of 3"):
        call(lambda p, r: 1.0, "scalar")
    np.testing.assert_array_equal(call(lambda p, r: np.array([1, 2, 3]), "ok"), [1.0, 2.0, 3.0])


def test_a_field_a_function_needs_is_checked_against_the_prompt_file_before_it_runs():
    """Named parameters without a default are the fields a function needs (`scale=1.0` is optional);
    one missing from the file stops the HostReward's construction, naming the function, the field,
    the file and its columns. A function reading **fields declares nothing: its KeyError on the first
    call lists the columns instead."""
    assert host_rewards.required_fields(needs_gold) == ["gold"]
    assert host_rewards.required_fields(words_equal_to_answer) == ["answer"]
    assert host_rewards.required_fields(reads_gold_from_fields) == []
    assert host_rewards.required_fields(lambda prompts, responses: []) == []
    rows = prompt_fields.PromptRows(["q0", "q1"], {"answer": ["5", "6"], "solution": ["x", "y"]}, "p.jsonl")
    decode = lambda tokens, mask: ["5", "7"]  # noqa: E731
    host_rewards.HostReward([_function(words_equal_to_answer, "match")], rows, decode)  # has `answer`: fine
    with pytest.raises(host_rewards.RewardFunctionError) as error:
        host_rewards.HostReward([_function(words_equal_to_answer, "match"), _function(needs_gold, "gold")], rows, decode)
    assert str(error.value) == (
        "config.rewards.functions: reward function tests:gold needs the prompt-file field 'gold', but "
        "config.data.prompts='p.jsonl' has the columns ['answer', 'solution'] besides the prompt; add the column to "
        "the file or give the parameter a default")
    reward = host_rewards.HostReward([_function(reads_gold_from_fields, "reads")], rows, decode)
    with pytest.raises(host_rewards.RewardFunctionError) as error:
        reward(np.array([0, 1]), np.zeros((2, 1)), np.ones((2, 1)))
    assert str(error.value) == (
        "config.rewards.functions: reward function tests:reads raised KeyError: 'gold' on prompt index 0 (response "
        "'5'): 'gold' is not a column of the prompt file (config.data.prompts='p.jsonl' has the columns ['answer', "
        "'solution'] besides the prompt)")


def test_host_reward_weights_fields_and_padding_rows():
    rows = prompt_fields.PromptRows(["q0", "q1", "q2"], {"answer": ["5", "6", "7"]})
    decode = lambda tokens, mask: [" ".join(str(t) for t, m in zip(r, mr) if m) for r, mr in zip(tokens, mask)]  # noqa
    fns = [_function(words_equal_to_answer, "match"),
           host_rewards.RewardFunction("length", "tests:length", -0.5, lambda p, r: [len(x.split()) for x in r])]
    reward = host_rewards.HostReward(fns, rows, decode)
    tokens = np.array([[5, 5, 9], [6, 1, 1], [7, 7, 7]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    out = reward(np.array([0, 1, -1]), tokens, mask)  # row 2 is padding: 0, not shown to the functions
    np.testing.assert_allclose(out["match"], [2 + 0.3, 1 + 0.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["length"], [3, 2, 0])
    np.testing.assert_allclose(out["score"], [2.3 - 1.5, 1.2 - 1.0, 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The host-reward RL iteration
# ----------------------------------------------------------------------------------------------
TEST_REWARD = "tests.reward_functions:words_equal_to_answer"  # a module the scripts can import too


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return arithmetic.export_arithmetic(tmp_path_factory.mktemp("arith"), n_sft=4, n_sft_eval=2, n_rl=64,
                                        n_heldout=4, n_corpus=4, max_value=12)


def rl_config(files, workdir_data, **overrides):
    """Tiny scratch actor over the arithmetic tokenizer's vocabulary, GRPO on the test reward."""
    config = ppo_configs.get_config("tiny,grpo")
    config.fast_compile = True
    config.actor.optim.decay_steps = 1000
    config.model.vocab_size = 64
    config.checkpoint.save_every = 2
    config.rollout.update(batch_size=16, prompt_len=32, max_new_tokens=8)
    config.rewards.rules.target_token.weight = 0.0
    config.rewards.functions = f"{TEST_REWARD},rlhf_jax.tasks.answers:answer_format=0.5"
    config.data.update(prompts=files["ppo_prompts"], tokenizer=files["tokenizer"], cache_dir=str(workdir_data))
    config.update_from_flattened_dict(overrides)
    return config


def test_reward_function_config_errors_before_compiling(task_files, tmp_path):
    from rlhf_jax.trainers import ppo

    config = rl_config(task_files, tmp_path / "data")
    ppo.validate_config(config, (8, 1, 1))
    for overrides, message in [({"rewards.functions": "my_missing_module:f"}, "cannot import 'my_missing_module'"),
                               ({"data.prompts": ""}, "needs config.data.prompts"),
                               ({"profile_phases": True}, "with config.rewards.functions: the host-reward iteration")]:
        bad = config.copy_and_resolve_references()
        bad.update_from_flattened_dict(overrides)
        with pytest.raises(ValueError, match=r"^config\.(rewards\.functions|profile_phases).*" + message):
            ppo.validate_config(bad, (8, 1, 1))


def test_prompt_file_and_vocabulary_errors_at_start_up_before_compiling(task_files, tmp_path, monkeypatch):
    """Found before anything is compiled, each as one line naming its key: a function needing a column the
    prompt file lacks (not after the first rollout), a tokenizer larger than the actor's vocabulary, a
    rollout batch of more prompts than the file has."""
    from rlhf_jax.trainers import ppo

    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit called before the config was validated")

    monkeypatch.setattr(jax, "jit", no_jit)
    prompts, tokenizer = task_files["ppo_prompts"], task_files["tokenizer"]
    size = len(loading.load_tokenizer(tokenizer))
    for i, (overrides, message) in enumerate([
            ({"rewards.functions": f"{TEST_REWARD},tests.reward_functions:needs_gold"},
             "config.rewards.functions: reward function tests.reward_functions:needs_gold needs the prompt-file field "
             f"'gold', but config.data.prompts='{prompts}' has the columns ['answer', 'solution'] besides the prompt; "
             "add the column to the file or give the parameter a default"),
            ({"model.vocab_size": size - 1},
             f"config.data.tokenizer='{tokenizer}': the tokenizer has {size} tokens (ids up to {size - 1}) but "
             f"config.model.vocab_size={size - 1}; set config.model.vocab_size to 0 (= the tokenizer's size) or at "
             f"least {size}"),
            ({"rollout.batch_size": 512},
             f"config.rollout.batch_size=512 (128 x config.algorithm.group_size=4) is larger than the 64 prompts in "
             f"{prompts}: an epoch would have no step; lower config.rollout.batch_size (to at most 256) or add data")]):
        with pytest.raises(ValueError) as error:
            ppo.train(rl_config(task_files, tmp_path / "data", **overrides), str(tmp_path / f"run{i}"))
        assert str(error.value) == message
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()


def test_a_raising_reward_function_prints_its_fatal_line_below_the_progress_bar(task_files, tmp_path, capsys):
    """The bar is closed before the one-line error is printed: the FATAL line starts a line of its own."""
    from rlhf_jax.trainers import ppo, setup

    config = rl_config(task_files, tmp_path / "data", num_steps=2,
                       **{"rewards.functions": "tests.reward_functions:always_raises"})
    with pytest.raises(SystemExit) as stop, setup.one_line_errors():
        ppo.train(config, str(tmp_path / "run"))
    assert stop.value.code == setup.EXIT_ERROR
    err = capsys.readouterr().err
    fatal = ("FATAL config error: config.rewards.functions: reward function tests.reward_functions:always_raises "
             "raised RuntimeError: reward server down on prompt index")
    assert "grpo:" in err and fatal in err  # the bar was drawn, then the error
    assert [line for line in err.split("\n") if fatal in line][0].startswith(fatal), err[-1000:]


def _pieces(config, mesh, workdir):
    from rlhf_jax.trainers import host_step, ppo, setup

    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False)
    state = ppo.initial_state(config, models, optimizers, state_sh)
    settings = ppo.settings_from_config(config)
    tokenizer = ppo.load_tokenizer(config, models)
    reward = host_step.make_host_reward(config, tokenizer, settings.sampling.eos_id)
    prompts, _ = ppo.make_data(config, str(workdir), tokenizer, ppo.group_size(config))
    batches = ppo.iteration_batches(prompts, None, ppo.group_size(config))
    step = host_step.host_reward_step(models, settings, optimizers, state_sh, mesh, False, reward,
                                      setup.compiler_options(config))
    return models, settings, state, reward, batches, step, tokenizer


def test_reward_function_values_reach_the_advantages_exactly(task_files, tmp_path):
    """Generate -> decode -> the functions -> rollout: scores equal Σ weight · f(decoded text) recomputed
    here, and GRPO's advantages equal a NumPy (r − mean_g) / (std_g + 1e-6) on every valid token."""
    from rlhf_jax import evaluation

    config = rl_config(task_files, tmp_path / "data")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    models, settings, state, reward, batches, _, tokenizer = _pieces(config, mesh, tmp_path)
    host = next(batches)
    prompts = {k: jax.numpy.asarray(host["prompts"][k]) for k in ("prompt_ids", "prompt_mask")}
    rng = algorithms.iteration_keys(state)[0]
    responses = jax.device_get(algorithms.generate_responses(models, settings, state, prompts, rng))
    values = reward(host["prompts"]["index"], responses["tokens"], responses["mask"])
    experience, metrics = jax.jit(lambda s, p, r, h: algorithms.rollout(models, settings, s, p, rng, r, h))(
        state, prompts, responses, {"sampled": values})

    texts = evaluation.decode_responses(tokenizer, responses["tokens"], responses["mask"], config.rollout.eos_id)
    rows = prompt_fields.read_prompt_rows(task_files["ppo_prompts"])
    gold = [rows.fields["answer"][i] for i in host["prompts"]["index"]]
    expected = np.array(words_equal_to_answer(None, texts, answer=gold)) + 0.5 * np.array(
        answers.answer_format(None, texts))
    np.testing.assert_allclose(np.asarray(experience.scores), expected, rtol=1e-6, atol=1e-6)
    assert np.std(expected) > 0  # the check below is not about all-equal groups
    grouped = expected.reshape(-1, config.algorithm.group_size)
    per_row = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()
    mask = np.asarray(responses["mask"])
    np.testing.assert_allclose(np.asarray(experience.advantages), np.where(mask > 0, per_row[:, None], 0.0),
                               rtol=1e-5, atol=1e-5)
    assert float(metrics["reward/words_equal_to_answer"]) == pytest.approx(np.mean(values["words_equal_to_answer"]))
    # the same responses sampled inside one program (no host reward) are the ones program 1 made
    inline, _ = jax.jit(lambda s, p: algorithms.rollout(models, settings, s, p, rng))(state, prompts)
    np.testing.assert_array_equal(np.asarray(inline.tokens), responses["tokens"])


def _train(config, workdir):
    from rlhf_jax.trainers import ppo

    result = ppo.train(config, str(workdir))
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return result, [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


DETERMINISTIC = ("loss", "reward/mean", "reward/words_equal_to_answer", "reward/answer_format", "kl", "entropy",
                 "policy/clipfrac", "response/length")


def test_one_vs_eight_devices_and_exact_resume_with_a_python_reward(task_files, tmp_path):
    """8 devices: 4 iterations straight == 2, then the same call resumed to 4 (metrics and the whole
    state exactly); the first 2 iterations on one device equal the 8-device ones."""
    config = rl_config(task_files, tmp_path / "data", num_steps=4)
    full, full_rows = _train(config, tmp_path / "full")
    assert [r["step"] for r in full_rows] == [1, 2, 3, 4]
    assert all("reward/words_equal_to_answer" in r and "reward/answer_format" in r for r in full_rows)
    half = config.copy_and_resolve_references()
    half.num_steps = 2
    _train(half, tmp_path / "resumed")
    resumed, resumed_rows = _train(config, tmp_path / "resumed")
    assert resumed_rows == full_rows
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(a, b)

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    from rlhf_jax.trainers import host_step

    _, _, state, _, batches, step, _ = _pieces(config, mesh, tmp_path / "one")
    for full_row in full_rows[:2]:
        state, metrics, _ = step(state, host_step.place(next(batches), mesh))
        for key in DETERMINISTIC:
            np.testing.assert_allclose(float(metrics[key]), full_row[key], rtol=1e-4, atol=1e-6, err_msg=key)
        assert float(metrics["time/reward"]) > 0


@multiprocess_test
def test_two_processes_score_their_own_rows_like_one_process(task_files, run_processes, script_env, tmp_path):
    """A Python reward with 2 JAX processes (each decodes and scores the rows it loaded, with its own
    prompt-file fields) gives the metrics of 1 process holding both devices: same mesh, same rows."""
    import subprocess
    import sys

    args = ["--config=configs/ppo.py:tiny,grpo", "--config.fast_compile=True", "--config.num_steps=2",
            "--config.actor.optim.decay_steps=1000", "--config.model.vocab_size=64", "--config.rollout.batch_size=16",
            "--config.rollout.prompt_len=32", "--config.rollout.max_new_tokens=8",
            "--config.rewards.rules.target_token.weight=0",
            f"--config.rewards.functions={TEST_REWARD},rlhf_jax.tasks.answers:answer_format=0.5",
            f"--config.data.prompts={task_files['ppo_prompts']}", f"--config.data.tokenizer={task_files['tokenizer']}",
            f"--config.data.cache_dir={tmp_path / 'data'}"]
    run_processes(args, tmp_path / "two")
    one = subprocess.run([sys.executable, "experiments/train_ppo.py", f"--workdir={tmp_path / 'one'}", *args],
                         cwd=REPO, env=script_env(2), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two_rows, one_rows = (metrics_lib.read_metrics(tmp_path / name) for name in ("two", "one"))
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2]
    for a, b in zip(two_rows, one_rows):
        for key in DETERMINISTIC:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# The arithmetic recipe's configuration and evaluation metrics
# ----------------------------------------------------------------------------------------------
def test_arithmetic_preset_and_task_checks():
    from configs import pipeline as pipeline_configs
    from rlhf_jax.pipeline import verifiable

    config = pipeline_configs.get_config("arithmetic")
    assert config.task == "arithmetic" and config.algorithm == "grpo"
    assert config.ppo.rewards.functions == config.arithmetic.reward_functions and config.ppo.rewards.rm_weight == 0
    verifiable.check_task(config)
    tiny = pipeline_configs.get_config("tiny")
    assert tiny.task == "instructions"
    tiny.task = "arithmetic"
    with pytest.raises(ValueError, match=r"^config.task='arithmetic' with the 'tiny' preset.*pipeline.py:arithmetic"):
        verifiable.check_task(tiny)
    tiny.task = "chess"
    with pytest.raises(ValueError, match=r"^config.task='chess' \(allowed"):
        verifiable.check_task(tiny)


def test_policy_metrics_by_hand():
    from rlhf_jax.pipeline import verifiable

    texts = [["1 + 1 = 2 . #### 2", "#### 3", "#### 2", "no answer"],  # 2 of 4 right
             ["#### 5", "#### 5", "#### 5", "#### 5"]]  # none right (gold 4)
    greedy = [["#### 2"], ["#### 4"]]
    out = verifiable.policy_metrics("sft", texts, greedy, ["2", "4"])
    assert out["sft_accuracy"] == pytest.approx(2 / 8)
    assert out["sft_pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["sft_pass@4"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["sft_greedy_accuracy"] == 1.0
    assert out["sft_format"] == pytest.approx(7 / 8)
    assert out["sft_length"] == pytest.approx((8 + 2 + 2 + 2 + 2 * 4) / 8)
