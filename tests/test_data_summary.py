"""Nothing silent about the data (issue 14): every split says what it read, dropped and truncated,
and warns (with the fix) above 5% dropped / truncated rows or 1% unknown tokens."""
from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import load_split
from rlhf_jax.trainers import setup

WORDS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "\n", ".", "what", "is", "it", "a", "b"]


@pytest.fixture(scope="module")
def tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                     pre_tokenizers.Split(Regex(r"\n|\."), behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_truncated_prompts_are_counted_and_warned(tokenizer, tmp_path):
    rows = [{"prompt": "what is a"}] * 19 + [{"prompt": " ".join(["a"] * 700)}]
    split = load_split("prompts", write(tmp_path / "p.jsonl", rows), tokenizer, max_len=32,
                       data_dir=str(tmp_path / "tfds"))
    s = split.summary()
    # default template: <|user|> \n CONTENT \n <|assistant|> \n  -> 700 + 5 tokens for the long one
    assert (s["rows_read"], s["rows_kept"], s["prompts_truncated"], s["prompts_truncated_pct"]) == (20, 20, 1, 5.0)
    assert s["longest_prompt"] == 705 and s["template"] == "default" and s["unk_pct"] == 0.0
    assert split.warnings() == []  # 5% is the limit, not above it
    split = load_split("prompts", write(tmp_path / "p2.jsonl", rows[1:]), tokenizer, max_len=32,
                       data_dir=str(tmp_path / "tfds"))
    assert split.summary()["prompts_truncated_pct"] == round(100 / 19, 2)
    assert split.warnings("config.rollout.prompt_len") == [
        f"{tmp_path / 'p2.jsonl'}: 5.26% of rows have a truncated prompt (longest 705 tokens, budget 32): "
        "raise config.rollout.prompt_len"]


def test_unknown_tokens_are_counted_and_warned(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "what is zzz", "response": "it is qqq."}])
    split = load_split("demonstrations", path, tokenizer, max_len=32, data_dir=str(tmp_path / "tfds"))
    # <|user|> \n what is zzz \n <|assistant|> \n it is qqq . <eos>: 13 tokens, 2 unknown
    s = split.summary()
    assert (s["tokens"], s["unk_tokens"], s["unk_pct"]) == (13, 2, 15.38)
    [line] = split.warnings()
    assert line.startswith(f"{path}: 15.38% of tokens map to the tokenizer's unknown token '<unk>'")


def test_dropped_rows_by_reason_and_the_summary_file(tokenizer, tmp_path, capsys):
    rows = [{"prompt": "what", "chosen": "a", "rejected": "b"}] * 9 + [{"prompt": "what", "chosen": "a",
                                                                          "rejected": "a"}]
    path = write(tmp_path / "c.jsonl", rows)
    split = load_split("comparisons", path, tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    s = split.summary()
    assert (s["rows_read"], s["rows_kept"], s["dropped"], s["dropped_pct"]) == (10, 9, {"tied_responses": 1}, 10.0)
    assert split.warnings()[0].startswith(f"{path}: 10.0% of rows dropped {{'tied_responses': 1}}")
    workdir = tmp_path / "run"
    workdir.mkdir()
    setup.report_data(workdir, "train", split, "config.data.max_len")
    setup.report_data(workdir, "eval", split, "config.data.max_len")
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert captured.err.splitlines()[0] == f"WARNING data[train]: {split.warnings('config.data.max_len')[0]}"
    assert out[0] == (f"data[train] {path}: 10 rows read, 9 kept, dropped: tied_responses 1; truncated prompts 0.0%, "
                      "responses 0.0%; template default; unknown tokens 0.0%")
    recorded = json.loads((workdir / "data_summary.json").read_text())
    assert sorted(recorded) == ["eval", "train"] and recorded["train"]["rows_kept"] == 9
    assert recorded["train"]["warnings"] == split.warnings("config.data.max_len")


def test_builtin_rankings_have_distinct_responses(tmp_path):
    from configs import rm as rm_configs
    from rlhf_jax import tasks

    d = rm_configs.get_config("tiny").data
    files = tasks.builtin_rankings(str(tmp_path), 0, d.builtin_prompts, d.builtin_responses, d.builtin_error_rate,
                                   d.builtin_labeler_temperature)
    rows = [json.loads(line) for line in open(files["rm_train"])]
    assert len(rows) == d.builtin_prompts  # none skipped on the default task
    assert all(len(set(r["responses"])) == len(r["responses"]) == d.builtin_responses for r in rows)


def test_a_truncated_response_warns_with_its_budget_and_the_keys_that_set_it(tokenizer, tmp_path):
    """A response's budget is max_len minus its kept prompt (at most max_prompt_len tokens), not max_len:
    the warning gives the budgets the cut rows had and names both keys (raise one, lower the other)."""
    short = {"prompt": "what is a", "response": "it is a ."}  # 8 + 5 tokens: fits max_len 16
    rows = [short] * 18 + [{"prompt": "what", "response": " ".join(["a"] * 20)}] * 2 + [
        {"prompt": "what is a b", "response": " ".join(["b"] * 20)}]
    path = write(tmp_path / "d.jsonl", rows)
    split = load_split("demonstrations", path, tokenizer, max_len=16, max_prompt_len=8, data_dir=str(tmp_path / "tfds"))
    s = split.summary()
    # "what": a 6-token prompt leaves 10 of the 21 response tokens; "what is a b": 9 -> 8 prompt tokens, 8 left
    assert (s["responses_truncated"], s["longest_response"], s["response_budget_min"], s["response_budget_max"]) == (
        3, 21, 8, 10)
    assert split.warnings(("config.data.max_len", "config.data.max_prompt_len")) == [
        f"{path}: 14.29% of rows have a truncated response (longest 21 tokens, budget 8-10 tokens = "
        "config.data.max_len 16 minus the prompt, which keeps up to 8 tokens (config.data.max_prompt_len)): raise "
        "config.data.max_len or lower config.data.max_prompt_len"]
    fits = load_split("demonstrations", write(tmp_path / "f.jsonl", [short]), tokenizer, max_len=16,
                      data_dir=str(tmp_path / "tfds")).summary()
    assert (fits["responses_truncated"], fits["response_budget_min"], fits["response_budget_max"]) == (0, 0, 0)


def test_a_packed_corpus_says_how_many_sequences_its_rows_became(tokenizer, tmp_path, capsys):
    """Pretraining text is packed, not dropped: the line says "packed into N sequences", and
    data_summary.json keeps rows_kept (= those sequences, as before) and adds packed_sequences."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(["what is a b"] * 10) + "\n")  # 10 documents of 4 tokens + EOS = 50 tokens
    split = load_split("text", str(path), tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    setup.report_data(workdir, "train", split, "config.data.max_len")
    assert capsys.readouterr().out.splitlines() == [
        f"data[train] {path}: 10 rows read, packed into 4 sequences of up to 16 tokens (50 tokens), dropped: none; "
        "unknown tokens 0.0%"]
    recorded = json.loads((workdir / "data_summary.json").read_text())["train"]
    assert (recorded["rows_read"], recorded["rows_kept"], recorded["packed_sequences"], recorded["tokens"]) == (
        10, 4, 4, 50)
    demos = load_split("demonstrations", write(tmp_path / "d.jsonl", [{"prompt": "what", "response": "a"}]),
                       tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    assert demos.summary()["packed_sequences"] is None


def test_a_batch_larger_than_the_split_names_the_key_the_count_and_the_file(tokenizer, tmp_path):
    """The trainers' check before any model is built (an epoch would have no step): one line that
    starts with the key (the scripts print it as `FATAL config error: ...`)."""
    path = write(tmp_path / "d.jsonl", [{"prompt": "what", "response": "a"}] * 3)
    split = load_split("demonstrations", path, tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    split.check_batch_size(3, "config.batch_size")  # fits
    with pytest.raises(ValueError) as error:
        split.check_batch_size(8, "config.batch_size")
    assert str(error.value) == (f"config.batch_size=8 is larger than the 3 examples in {path}: an epoch would have no "
                                "step; lower config.batch_size (to at most 3) or add data")
    prompts = load_split("prompts", path, tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError) as error:  # RL: a batch of groups, each prompt sampled group_size times
        prompts.check_batch_size(16, "config.rollout.batch_size", "prompts", 4, "config.algorithm.group_size")
    assert str(error.value) == (
        f"config.rollout.batch_size=16 (4 x config.algorithm.group_size=4) is larger than the 3 prompts in {path}: an "
        "epoch would have no step; lower config.rollout.batch_size (to at most 12) or add data")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("what is a b\n\nwhat is a b\n")
    text = load_split("text", str(corpus), tokenizer, max_len=16, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=r"^config.batch_size=2 is larger than the 1 sequences of 16 tokens \(packed "
                                         r"from 2 rows\) in .*corpus.txt"):
        text.check_batch_size(2, "config.batch_size")
