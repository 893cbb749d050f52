"""Data package: formats, TFDS array_record round trip, chat formatting, truncation, batching,
checkpointable iteration, process sharding and error messages."""
from __future__ import annotations

import gzip
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import (DataError, builders, epoch_plan, formats, hh_ranking_batches, load_split, read_records,
                           tokenization)
from rlhf_jax.data.iterator import BatchIterator

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny byte-level BPE trained on the fixture files (no downloads)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(FIXTURES.iterdir())], trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def chatml_tokenizer(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)


@pytest.fixture(scope="module")
def bos_tokenizer(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def decode(tokenizer, ids, mask=None):
    ids = np.asarray(ids)
    return tokenizer.decode(ids if mask is None else ids[np.asarray(mask) == 1])


def write(path: pathlib.Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------
# The real HH-RLHF sample (experiments/data/hh-rlhf, vendored)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hh_path(sample_data_dir):
    return str(sample_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz")


def test_hh_sample_parses_fully(hh_path):
    records = list(read_records("hh", [hh_path]))
    assert len(records) == 2312
    for r in records:
        assert r["messages"] and r["messages"][0]["role"] == "user"           # a dialogue prompt
        assert {m["role"] for m in r["messages"]} <= {"user", "assistant"}
        assert r["messages"][-1]["role"] == "user"                             # the assistant answers next
        assert r["responses"][0] != r["responses"][1] and r["ranks"] == [0, 1]
    # Line 1, by hand: five turns, then the two final assistant answers.
    first = records[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["messages"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["messages"][2]["content"] == "yep"
    assert first["messages"][4]["content"] == "okay some of these do not have anything to do with pens"
    assert first["responses"][0].startswith("No, sorry!  All of these involve a pen")
    assert first["responses"][1].startswith("There are lots of funny things you can do with pens")
    # Line 1255: the chosen transcript goes on with an inline "Human:" turn; the prompt is the shared part.
    odd = records[1254]
    assert odd["line"] == 1255 and len(odd["messages"]) == 3
    assert odd["messages"][-1] == {"role": "user", "content": "Isn't that drag kings?"}
    assert odd["responses"][0].startswith("No. Men who impersonate stereotypical women are called drag kings.")
    assert "Human: Then how do they" in odd["responses"][0]
    assert odd["responses"][1].startswith("A drag king is the opposite of a drag queen")
    # Line 87: an empty chosen answer is kept (it differs from the rejected one).
    assert records[86]["responses"] == ["", records[86]["responses"][1]]
    assert records[86]["responses"][1].startswith("Sure, the address is")


def test_hh_sample_through_tfds_and_ranking_batches(hh_path, tokenizer, data_dir):
    source = builders.prepare_source("hh", hh_path, data_dir)
    assert len(source) == 2312
    direct = list(read_records("hh", [hh_path]))
    for i in (0, 86, 1254, 2311):  # random access into the array_record copy gives the parsed row back
        assert builders.decode_record(source[i]) == direct[i]
    assert "tensorflow" not in sys.modules

    split = load_split("hh", hh_path, tokenizer, max_len=256, data_dir=data_dir)
    # Every kept comparison is distinct after truncation; every dropped one is counted with its line.
    assert len(split) + split.num_dropped == 2312
    assert split.num_dropped == sum(len(v) for v in split.dropped_lines.values())
    batch = next(split.iterator(8, seed=3, process_index=0, process_count=1))
    assert batch["input_ids"].shape == (8, 2, 256) and batch["attention_mask"].shape == (8, 2, 256)
    assert batch["ranks"].tolist() == [[0, 1]] * 8
    # Line 10 by hand, short enough to be untruncated (default template: no chat template here).
    row = next(i for i in range(len(split)) if split.record(i)["line"] == 10)
    chosen, rejected = (decode(tokenizer, ids) for ids in split[row]["input_ids"])
    prompt = "<|user|>\nIs it possible to download a car?\n<|assistant|>\n"
    assert chosen == prompt + "I’m not sure what you mean. Can you clarify?<eos>"
    assert rejected == prompt + "I’m sorry, I don’t understand.<eos>"
    # Line 1 is longer than 256 tokens: both sequences share the left-truncated prompt and fill max_len.
    first = split[next(i for i in range(len(split)) if split.record(i)["line"] == 1)]["input_ids"]
    assert max(len(first[0]), len(first[1])) == 256
    assert not decode(tokenizer, first[0]).startswith("<|user|>\nwhat are some pranks")
    assert decode(tokenizer, first[0][:128]) == decode(tokenizer, first[1][:128])    # same prompt tokens


def test_hh_ranking_batches_from_fixture(tokenizer, data_dir):
    it = hh_ranking_batches(str(FIXTURES / "hh.jsonl"), tokenizer, max_len=64, batch_size=3, seed=0,
                            data_dir=data_dir, process_index=0, process_count=1, shuffle=False)
    batch = next(it)
    assert batch["input_ids"].shape == (3, 2, 64) and batch["ranks"].tolist() == [[0, 1]] * 3
    assert decode(tokenizer, batch["input_ids"][1, 1], batch["attention_mask"][1, 1]) == (
        "<|user|>\nWhat is two plus two?\n<|assistant|>\nFourteen, I think.<eos>")


# ----------------------------------------------------------------------------------------------
# Fixture formats
# ----------------------------------------------------------------------------------------------
def test_demonstrations_lm_batch_loss_only_on_assistant_turns(tokenizer, data_dir):
    split = load_split("demonstrations", FIXTURES / "demonstrations.jsonl", tokenizer, max_len=64, data_dir=data_dir)
    assert len(split) == 4 and split.num_dropped == 0  # the blank line 3 is not a row
    assert [split.record(i)["line"] for i in range(4)] == [1, 2, 4, 5]
    batch = split.collate([0, 2])
    assert batch["input_ids"].shape == (2, 64)
    ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert decode(tokenizer, ids[0], mask[0]) == "<|user|>\nName a colour of the sky.\n<|assistant|>\nBlue.<eos>"
    assert decode(tokenizer, ids[0], loss[0]) == "Blue.<eos>"
    assert decode(tokenizer, ids[1], mask[1]) == ("<|system|>\nBe brief.\n<|user|>\nHi there.\n<|assistant|>\n"
                                                 "Hello.<eos><|user|>\nSay a fruit.\n<|assistant|>\nAn apple.<eos>")
    assert decode(tokenizer, ids[1], loss[1]) == "Hello.<eos>An apple.<eos>"   # both assistant turns
    n = int(mask[1].sum())
    assert mask[1, :n].all() and not mask[1, n:].any()                          # right-padded
    assert (ids[1, n:] == tokenizer.pad_token_id).all() and not (loss * (1 - mask)).any()


def test_chat_template_of_the_tokenizer(chatml_tokenizer, data_dir):
    split = load_split("demonstrations", FIXTURES / "demonstrations.jsonl", chatml_tokenizer, max_len=64,
                       data_dir=data_dir)
    ex = split[2]
    msgs = split.record(2)["messages"] + [{"role": "assistant", "content": split.record(2)["responses"][0]}]
    rendered = chatml_tokenizer.apply_chat_template(msgs, tokenize=False)
    # The template's text plus EOS (its end-of-turn <|im_end|> is not the tokenizer's EOS).
    assert decode(chatml_tokenizer, ex["input_ids"]) == rendered + "<eos>"
    assert decode(chatml_tokenizer, ex["input_ids"], ex["loss_mask"]) == (
        "Hello.<|im_end|>\nAn apple.<|im_end|>\n<eos>")
    prompts = load_split("prompts", FIXTURES / "prompts.jsonl", chatml_tokenizer, max_len=32, data_dir=data_dir)
    assert decode(chatml_tokenizer, prompts[0]["prompt_ids"]) == (
        "<|im_start|>user\nName a colour of the sky.<|im_end|>\n<|im_start|>assistant\n")


def test_comparisons_and_rankings_give_ranking_batches(tokenizer, data_dir):
    comp = load_split("comparisons", FIXTURES / "comparisons.jsonl", tokenizer, max_len=48, data_dir=data_dir)
    b = comp.collate([1, 2])
    assert b["input_ids"].shape == (2, 2, 48) and b["ranks"].tolist() == [[0, 1], [0, 1]]
    assert decode(tokenizer, b["input_ids"][0, 0], b["attention_mask"][0, 0]).endswith("<|assistant|>\nFour.<eos>")
    assert decode(tokenizer, b["input_ids"][0, 1], b["attention_mask"][0, 1]).endswith("<|assistant|>\nFive.<eos>")
    assert decode(tokenizer, b["input_ids"][1, 1], b["attention_mask"][1, 1]) == (
        "<|user|>\nHi there.\n<|assistant|>\nHello.<eos><|user|>\nSay a fruit.\n<|assistant|>\nA chair.<eos>")

    ranked = load_split("rankings", FIXTURES / "rankings.jsonl", tokenizer, max_len=48, data_dir=data_dir)
    b = ranked.collate([0, 1, 2])
    assert b["input_ids"].shape == (3, 3, 48)
    # ranking lists indices best first: [1, 2, 0] means Blue. > Grey. > A cat., so ranks = [2, 0, 1].
    assert b["ranks"].tolist() == [[2, 0, 1], [0, 1, 2], [1, 2, 0]]
    best = [decode(tokenizer, b["input_ids"][p, k], b["attention_mask"][p, k]).split("\n")[-1]
            for p, k in enumerate(np.argmin(b["ranks"], axis=1))]
    assert best == ["Blue.<eos>", "Four.<eos>", "An apple.<eos>"]
    # The same rankings file as SFT data trains on the best response.
    lm = load_split("rankings", FIXTURES / "rankings.jsonl", tokenizer, max_len=48, batch_format="lm",
                    data_dir=data_dir)
    assert decode(tokenizer, lm[0]["input_ids"], lm[0]["loss_mask"]) == "Blue.<eos>"


def test_prompts_are_left_padded_with_index(tokenizer, data_dir):
    split = load_split("prompts", FIXTURES / "prompts.jsonl", tokenizer, max_len=40, data_dir=data_dir)
    b = split.collate([4, 2])
    assert b["prompt_ids"].shape == (2, 40) and b["index"].tolist() == [4, 2]
    n = int(b["prompt_mask"][0].sum())
    assert not b["prompt_mask"][0, : 40 - n].any() and b["prompt_mask"][0, 40 - n:].all()   # left padding
    assert decode(tokenizer, b["prompt_ids"][0], b["prompt_mask"][0]) == "<|user|>\nSay a fruit.\n<|assistant|>\n"
    assert decode(tokenizer, b["prompt_ids"][1], b["prompt_mask"][1]) == (
        "<|user|>\nHi there.\n<|assistant|>\nHello.<eos><|user|>\nSay a fruit.\n<|assistant|>\n")
    # HH comparisons also give PPO prompts (everything before the final assistant turn).
    hh = load_split("hh", FIXTURES / "hh.jsonl", tokenizer, max_len=40, batch_format="prompts", data_dir=data_dir,
                    template="hh")
    assert decode(tokenizer, hh[0]["prompt_ids"]) == (
        "\n\nHuman: Hi there.\n\nAssistant: Hello.<eos>\n\nHuman: Say a fruit.\n\nAssistant: ")


def test_hh_fixture_gz_and_text_corpus_packing(tokenizer, data_dir, tmp_path):
    gz = tmp_path / "hh.jsonl.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "hh.jsonl").read_bytes()))
    rec = list(read_records("hh", [str(gz)]))
    assert [r["responses"] for r in rec] == [
        ["An apple.", "A chair."], ["Four.", "Fourteen, I think."],
        ["One, two, three.  Human: Now backwards.\n\nAssistant: Three, two, one.", "No."]]
    assert rec[0]["messages"] == [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "Say a fruit."}]

    docs = [r["text"] for r in read_records("text", [str(FIXTURES / "corpus.txt")])]
    assert docs == ["The cat sat on the mat.\nIt was a warm day.", "Blue is the colour of the sky.",
                    "Two plus two is four.\nThree comes after two.\nOne comes before two."]
    lines = [r["text"] for r in formats.read_text_records(str(FIXTURES / "corpus.txt"), "line")]
    assert len(lines) == 6 and lines[0] == "The cat sat on the mat."
    split = load_split("text", FIXTURES / "corpus.txt", tokenizer, max_len=16, data_dir=data_dir)
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert len(split) == -(-len(stream) // 16)                                       # ceil(len / 16) blocks
    assert np.concatenate([split[i]["input_ids"] for i in range(len(split))]).tolist() == stream
    b = split.collate(list(range(len(split))))
    assert (b["loss_mask"] == b["attention_mask"]).all() and b["attention_mask"].sum() == len(stream)


# ----------------------------------------------------------------------------------------------
# Truncation and drops
# ----------------------------------------------------------------------------------------------
def test_truncation_budget_by_hand():
    # prompt 30, response 10, max_len 32, max_prompt_len 16: the prompt needs to give up only 8
    # (keeps max(32 - 10, 16) = 22), the response keeps all 10: 22 + 10 = 32.
    assert tokenization.truncation_budget(30, 10, 32, 16) == (22, 10)
    # response 40: prompt keeps its floor of 16, the response the remaining 32 - 16 = 16.
    assert tokenization.truncation_budget(30, 40, 32, 16) == (16, 16)
    assert tokenization.truncation_budget(5, 6, 32, 16) == (5, 6)                # fits: untouched
    ids = np.arange(10, 20)
    assert tokenization.left_truncate(ids, 4).tolist() == [16, 17, 18, 19]
    assert tokenization.left_truncate(np.array([1, 5, 6, 7, 8]), 3, bos=1).tolist() == [1, 7, 8]


def test_prompt_left_response_right_truncation_keeps_bos(bos_tokenizer, data_dir):
    full = load_split("demonstrations", FIXTURES / "demonstrations.jsonl", bos_tokenizer, max_len=64,
                      data_dir=data_dir)[4 - 1]
    cut = load_split("demonstrations", FIXTURES / "demonstrations.jsonl", bos_tokenizer, max_len=8, max_prompt_len=5,
                     data_dir=data_dir)[3]
    ids, loss = full["input_ids"], full["loss_mask"]
    assert ids[0] == bos_tokenizer.bos_token_id
    prompt, response = ids[loss == 0], ids[loss == 1]
    assert len(prompt) > 5 and len(response) > 3
    # max_len 8, prompt floor 5: BOS + the last 4 prompt tokens, then the first 3 response tokens.
    assert cut["input_ids"].tolist() == [prompt[0], *prompt[-4:], *response[:3]]
    assert cut["loss_mask"].tolist() == [0] * 5 + [1] * 3


def test_drops_are_counted_with_lines(tokenizer, data_dir, tmp_path):
    lengths = [len(x["input_ids"]) for x in load_split("demonstrations", FIXTURES / "demonstrations.jsonl",
                                                       tokenizer, max_len=512, data_dir=data_dir).examples]
    max_len = sorted(lengths)[1]                  # the two shortest fit, the longer ones are dropped
    split = load_split("demonstrations", FIXTURES / "demonstrations.jsonl", tokenizer, max_len=max_len,
                       truncate=False, data_dir=data_dir)
    too_long = [line for line, n in zip([1, 2, 4, 5], lengths) if n > max_len]
    assert too_long and split.dropped_lines == {"too_long": too_long}
    assert split.num_dropped == len(too_long) and len(split) == 4 - len(too_long)
    tied = write(tmp_path / "tied.jsonl", [json.dumps({"prompt": "Hi.", "chosen": "Same", "rejected": "Same"}),
                                           json.dumps({"prompt": "Hi.", "chosen": "Yes", "rejected": "No"})])
    split = load_split("comparisons", tied, tokenizer, max_len=32, data_dir=data_dir)
    assert split.drop_counts == {"tied_responses": 1} and split.dropped_lines == {"tied_responses": [1]}
    assert len(split) == 1
    only_tied = write(tmp_path / "only_tied.jsonl", [json.dumps({"prompt": "Hi.", "chosen": "A", "rejected": "A"})])
    with pytest.raises(DataError, match=r"only_tied.jsonl: empty split: all 1 rows were dropped"):
        load_split("comparisons", only_tied, tokenizer, max_len=32, data_dir=data_dir)



def test_a_row_the_chat_template_cannot_render_names_its_file_and_line(backend, tmp_path, data_dir):
    """The built-in task's template knows user and assistant turns only: a system turn on line 2 is
    one DataError naming the file, the line and the field, not a jinja2 traceback."""
    from rlhf_jax.tasks.tokenizer import CHAT_TEMPLATE

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  chat_template=CHAT_TEMPLATE)
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    path = write(tmp_path / "system.jsonl", [json.dumps({"messages": turns}),
                                             json.dumps({"messages": [{"role": "system", "content": "Be brief."}, *turns]})])
    with pytest.raises(DataError, match=re.escape(path) + r", line 2, field 'messages': the chat template cannot "
                                        r"render this row's messages: unsupported chat role: system$"):
        load_split("demonstrations", path, tok, max_len=32, data_dir=data_dir)
    assert len(load_split("demonstrations", write(tmp_path / "ok.jsonl", [json.dumps({"messages": turns})]), tok,
                          max_len=32, data_dir=data_dir)) == 1

# ----------------------------------------------------------------------------------------------
# Iteration: shuffling, resume, sharding, drop_remainder, bucketing
# ----------------------------------------------------------------------------------------------
def collect(it, n):
    return [next(it) for _ in range(n)]


def rows_iterator(num, batch, **kw):
    return BatchIterator(num, lambda rows: {"rows": np.asarray(rows)}, batch, kw.pop("seed", 7),
                         process_index=kw.pop("process_index", 0), process_count=kw.pop("process_count", 1), **kw)


def test_epoch_order_is_a_seeded_permutation():
    it = rows_iterator(10, 4, seed=7)
    got = [b["rows"].tolist() for b in collect(it, 4)]
    # Independent: epoch e is default_rng([seed, e]).permutation(10); 10 // 4 = 2 batches, rows 8, 9 skipped.
    p0, p1 = np.random.default_rng([7, 0]).permutation(10), np.random.default_rng([7, 1]).permutation(10)
    assert got == [p0[:4].tolist(), p0[4:8].tolist(), p1[:4].tolist(), p1[4:8].tolist()]
    assert it.get_state() == {"epoch": 1, "batch_in_epoch": 2, "num_examples": 10, "batch_size": 4, "seed": 7}
    keep = rows_iterator(10, 4, drop_remainder=False, num_epochs=1)
    batches = [b["rows"] for b in keep]
    assert len(batches) == 3 and batches[-1].tolist()[2:] == [-1, -1]          # padded to the batch size
    assert sorted(np.concatenate(batches)[:10].tolist()) == list(range(10))    # every row exactly once


def test_resume_mid_epoch_continues_with_next_unseen_batch(tokenizer, data_dir):
    split = load_split("prompts", FIXTURES / "prompts.jsonl", tokenizer, max_len=32, data_dir=data_dir)
    straight = split.iterator(2, seed=5, process_index=0, process_count=1)
    reference = [b["index"].tolist() for b in collect(straight, 7)]               # crosses epoch boundaries
    first = split.iterator(2, seed=5, process_index=0, process_count=1)
    seen = [b["index"].tolist() for b in collect(first, 3)]
    state = json.loads(json.dumps(first.get_state()))                            # as stored in a checkpoint
    resumed = split.iterator(2, seed=5, process_index=0, process_count=1)
    resumed.set_state(state)
    assert seen + [b["index"].tolist() for b in collect(resumed, 4)] == reference
    default = split.iterator(2, seed=5)                  # process index/count from JAX: 0 of 1 here
    assert next(default)["index"].tolist() == reference[0]
    with pytest.raises(ValueError, match="seed=5, but this iterator has seed=6"):
        split.iterator(2, seed=6, process_index=0, process_count=1).set_state(state)


def test_process_sharding_partitions_each_global_batch():
    global_it = rows_iterator(24, 8, seed=1)
    shards = [rows_iterator(24, 8, seed=1, process_index=p, process_count=4) for p in range(4)]
    seen = []
    for _ in range(3):  # one epoch
        glob = next(global_it)["rows"]
        local = [next(s)["rows"] for s in shards]
        assert all(len(x) == 2 for x in local)
        assert np.concatenate(local).tolist() == glob.tolist()                    # process order = global order
        seen += glob.tolist()
    assert sorted(seen) == list(range(24))                                         # disjoint and complete
    with pytest.raises(ValueError, match="divisible by the process count 3"):
        rows_iterator(24, 8, process_count=3)


def test_length_bucketing(tokenizer, data_dir):
    split = load_split("prompts", FIXTURES / "prompts.jsonl", tokenizer, max_len=40, data_dir=data_dir)
    lengths = [len(split[i]["prompt_ids"]) for i in range(len(split))]
    it = split.iterator(1, seed=0, process_index=0, process_count=1, bucket_boundaries=(8, 16, 24), num_epochs=1)
    shapes = {int(b["index"][0]): b["prompt_ids"].shape[1] for b in it}
    assert sorted(shapes) == list(range(5))
    assert shapes == {i: next(x for x in (8, 16, 24, 40) if x >= n) for i, n in enumerate(lengths)}
    plan = epoch_plan(8, 2, 0, 0, lengths=[5, 1, 7, 3, 8, 2, 6, 4], bucket_window=4)
    assert sorted(map(sorted, plan.tolist())) == [[0, 6], [1, 5], [2, 4], [3, 7]]   # neighbours in length


# ----------------------------------------------------------------------------------------------
# Bad input: the message names the file, the 1-based line and the field
# ----------------------------------------------------------------------------------------------
GOOD = json.dumps({"prompt": "Hi.", "chosen": "Yes", "rejected": "No"})


@pytest.mark.parametrize("kind,bad_line,pattern", [
    ("comparisons", '{"prompt": "Hi.", "chosen": "Yes",', r"line 2: malformed JSON"),
    ("comparisons", '["a list"]', r"line 2: expected a JSON object, got list"),
    ("comparisons", json.dumps({"prompt": "Hi.", "chosen": "Yes"}), r"line 2, field 'rejected': missing field"),
    ("comparisons", json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}),
     r"line 2, field 'prompt': must be a string, got an integer"),
    ("demonstrations", json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}),
     r"line 2, field 'messages\[1\].role': unknown role 'bot'"),
    ("demonstrations", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
     r"line 2, field 'messages': the last message must be from the assistant"),
    ("demonstrations", json.dumps({"prompt": "Hi", "response": None}),
     r"line 2, field 'response': must be a string, got null"),
    ("prompts", json.dumps({"text": "Hi"}), r"line 2, field 'prompt': missing field \(or 'messages'\)"),
    ("rankings", json.dumps({"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 0]}),
     r"line 2, field 'ranking': must list every index 0..1"),
    ("rankings", json.dumps({"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, True]}),
     r"line 2, field 'ranking\[1\]': must be an integer, got a boolean"),
    ("hh", json.dumps({"chosen": "Hello", "rejected": "Bye"}),
     r"line 2, field 'chosen': chosen and rejected share no"),
    ("hh", json.dumps({"chosen": "Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"}),
     r"line 2, field 'chosen': a transcript must start with"),
])
def test_bad_input_names_file_line_field(kind, bad_line, pattern, tmp_path, tokenizer, data_dir):
    first = {"comparisons": GOOD, "demonstrations": json.dumps({"prompt": "Hi", "response": "Yo"}),
             "prompts": json.dumps({"prompt": "Hi"}), "hh": json.dumps(
                 {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Hi\n\nAssistant: b"}),
             "rankings": json.dumps({"prompt": "Hi", "responses": ["a", "b"], "ranking": [1, 0]})}[kind]
    path = write(tmp_path / "bad.jsonl", [first, bad_line])
    with pytest.raises(DataError, match=re.escape(path) + ", " + pattern):
        load_split(kind, path, tokenizer, max_len=32, data_dir=data_dir)


def test_inconsistent_k_empty_split_and_bad_bytes(tmp_path, tokenizer, data_dir):
    three = json.dumps({"prompt": "Hi", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]})
    two = json.dumps({"prompt": "Hi", "responses": ["a", "b"], "ranking": [1, 0]})
    path = write(tmp_path / "k.jsonl", [three, "", two])
    with pytest.raises(DataError, match=r"k.jsonl, line 3, field 'responses': has 2 responses but earlier lines have 3"):
        list(read_records("rankings", [path]))
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(empty) + r": empty split: no examples"):
        load_split("prompts", empty, tokenizer, max_len=32, data_dir=data_dir)
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl, line 2: not valid UTF-8"):
        list(read_records("prompts", [str(binary)]))
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        load_split("prompts", tmp_path / "missing.jsonl", tokenizer, max_len=32, data_dir=data_dir)


def test_cache_is_keyed_by_file_content(tmp_path, tokenizer, data_dir):
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi."})])
    assert len(load_split("prompts", path, tokenizer, max_len=16, data_dir=data_dir)) == 1
    write(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi."}), json.dumps({"prompt": "Yo."})])
    assert len(load_split("prompts", path, tokenizer, max_len=16, data_dir=data_dir)) == 2    # rebuilt


def test_building_prints_nothing_and_leaves_tfds_as_it_was(tmp_path, data_dir, capfd, caplog):
    """TFDS's banner, progress bars and 'custom data configuration' warning stay out of the
    trainers' output; its progress bars are back on afterwards and other warnings still pass."""
    import logging

    from tensorflow_datasets.core.utils import tqdm_utils

    path = write(tmp_path / "quiet.jsonl", [json.dumps({"prompt": "Hi."})])
    with caplog.at_level(logging.INFO):
        assert len(builders.prepare_source("prompts", path, str(tmp_path / "cache"))) == 1
        assert capfd.readouterr() == ("", "")
        logging.getLogger("absl").warning("Using custom data configuration: still shown outside a build")
    assert [r.getMessage() for r in caplog.records if "custom data configuration" in r.getMessage()] == [
        "Using custom data configuration: still shown outside a build"]
    assert tqdm_utils._active  # TFDS's default again

def test_config_errors_are_clear(tokenizer, data_dir):
    demos = FIXTURES / "demonstrations.jsonl"
    with pytest.raises(ValueError, match=r"kind='demonstrations' gives batch_format \('lm', 'prompts'\), not 'ranking'"):
        load_split("demonstrations", demos, tokenizer, max_len=32, batch_format="ranking", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"unknown data kind 'sft'"):
        load_split("sft", demos, tokenizer, max_len=32, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"max_prompt_len=32 must be in \[1, 31\] for max_len=32"):
        load_split("demonstrations", demos, tokenizer, max_len=32, max_prompt_len=32, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"template must be one of"):
        load_split("demonstrations", demos, tokenizer, max_len=32, template="chatml", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 4 examples"):
        load_split("demonstrations", demos, tokenizer, max_len=32, data_dir=data_dir).iterator(
            8, process_index=0, process_count=1)
