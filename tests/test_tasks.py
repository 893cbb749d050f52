"""Built-in instruction task: gold judge, labelers, demonstrations, corpus, tokenizer, export."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.tasks import Example, gold_score

SORT = Example(id="t-0", kind="sort", prompt="sort : d a c", answer="a c d")
COUNT = Example(id="t-1", kind="count", prompt="count : f z i t", answer="4")


# ----------------------------------------------------------------------------- gold judge

@pytest.mark.parametrize("response, expected", [
    ("a c d", 1.0),                          # exact
    ("", 0.0),                               # empty
    ("  a   c d ", 1.0),                     # whitespace is not content
    ("sure ! the answer is : a c d", 0.4),   # correct, 6 extra words: 1 * (1 - 0.1*6)
    ("a c d x", 0.9),                        # 1 extra word: 1 * (1 - 0.1)
    ("x a c d", 0.9),                        # the answer may start anywhere; still 1 extra
    ("a d c", 2 / 3),                        # best span "a d": 1 deletion -> 1 - 1/3
    ("d c a", 1 / 3),                        # reversed: only 1 word alignable -> 1 - 2/3
    ("a c", 2 / 3),                          # 1 missing word: 1 - 1/3
    ("A C D", 0.5),                          # right letters, wrong case: 3*0.5 -> 1 - 1.5/3
    ("x y z", 0.0),                          # nothing right: distance 3 -> 0
    ("here you go : a d c", 0.4),            # (1 - 1/3) * (1 - 0.1*4)
    ("a c d " + "the " * 10, 0.0),           # 10 extra words kill brevity
])
def test_gold_score_known_responses_sort(response, expected):
    assert gold_score(SORT, response) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("response, expected", [
    ("4", 1.0), ("5", 0.5),                  # off by one costs |5-4|/2 = 0.5
    ("2", 0.0),                              # off by two: cost min(1, 2/2) = 1
    ("4 items", 0.9), ("four", 0.0),
])
def test_gold_score_known_responses_count(response, expected):
    assert gold_score(COUNT, response) == pytest.approx(expected, abs=1e-12)


def test_gold_scores_batch_matches_single_and_checks_lengths():
    examples = tasks.sample_examples(40, seed=3)
    rng = np.random.default_rng(0)
    responses = [tasks.demonstration(e, rng) for e in examples]
    batch = tasks.gold_scores(examples, responses)
    assert batch.shape == (40,) and batch.dtype == np.float64
    np.testing.assert_array_equal(batch, [gold_score(e, r) for e, r in zip(examples, responses)])
    assert np.all((batch >= 0) & (batch <= 1))
    with pytest.raises(ValueError, match="2 examples but 1 responses"):
        tasks.gold_scores(examples[:2], responses[:1])


def test_win_rate_counts_ties_half():
    # wins: 1 > 0.5 (1), 0.5 == 0.5 (0.5), 0.2 < 0.9 (0) -> 1.5 / 3
    assert tasks.win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- examples

def _reference_answer(prompt: str) -> str:
    """Independent solver that parses the prompt text."""
    head, items_text = prompt.split(" : ")
    items = items_text.split()
    words = head.split()
    if head == "sort":
        return " ".join(sorted(items, key=lambda s: (len(s), s) if s.isdigit() else (0, s)))
    if head == "reverse":
        return " ".join(items[::-1])
    if head == "count":
        return str(len(items))
    if head == "uppercase":
        return " ".join(s.upper() for s in items)
    if head == "remove vowels":
        return " ".join(s for s in items if s not in "aeiou")
    if words[0] == "repeat":
        return " ".join(items * int(words[1]))
    if words[0] == "first":
        return " ".join(items[: int(words[1])])
    if head == "largest":
        return str(max(map(int, items)))
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_examples_answers_are_correct_short_and_cover_all_kinds():
    examples = tasks.sample_examples(800, seed=1)
    for e in examples:
        assert e.answer == _reference_answer(e.prompt), e
        assert 1 <= len(e.answer.split()) <= 12
        assert len(e.prompt.split()) <= 11
    assert {e.kind for e in examples} == set(tasks.KINDS)
    assert len({e.id for e in examples}) == 800


def test_splits_are_disjoint_and_deterministic():
    train = tasks.sample_examples(1500, seed=0, split="train")
    heldout = tasks.sample_examples(500, seed=0, split="heldout")
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert all(tasks.split_of(e.prompt) == "heldout" for e in heldout)
    # about HELDOUT_FRACTION = 0.2 of raw prompts go to heldout: the train rows are a sample
    # of the rest, so check the hash split on fresh strings instead (binomial sd ~ 0.009)
    fraction = np.mean([tasks.split_of(f"sort : {i}") == "heldout" for i in range(2000)])
    assert abs(fraction - 0.2) < 0.04
    assert tasks.sample_examples(1500, seed=0) == train
    assert tasks.sample_examples(100, seed=0) == train[:100]      # prefix-consistent
    assert tasks.sample_examples(100, seed=1) != train[:100]
    with pytest.raises(ValueError, match="split"):
        tasks.sample_examples(1, seed=0, split="test")
    with pytest.raises(ValueError, match="kinds"):
        tasks.sample_examples(1, seed=0, kinds=("sort", "juggle"))
    only_sort = tasks.sample_examples(50, seed=0, kinds=("sort",))
    assert {e.kind for e in only_sort} == {"sort"}


# ----------------------------------------------------------------------------- demonstrations

def _strip_chatter(text: str) -> tuple[str, bool]:
    for preamble in tasks.PREAMBLES:
        if text.startswith(preamble + " "):
            text = text[len(preamble) + 1:]
            for suffix in tasks.SUFFIXES:
                if text.endswith(" " + suffix):
                    text = text[: -len(suffix) - 1]
            return text, True
    return text, False


def test_demonstrations_have_configured_error_and_verbosity_rates():
    n, error_rate, verbose_rate = 4000, 0.3, 0.2
    examples = tasks.sample_examples(n, seed=5)
    rng = np.random.default_rng(11)
    demos = [tasks.demonstration(e, rng, error_rate=error_rate, verbose_rate=verbose_rate)
             for e in examples]
    stripped = [_strip_chatter(d) for d in demos]
    wrong = np.array([core != e.answer for (core, _), e in zip(stripped, examples)])
    verbose = np.array([v for _, v in stripped])
    # binomial sd: sqrt(.3*.7/4000) = 0.0072, sqrt(.2*.8/4000) = 0.0063; allow ~4 sd
    assert abs(wrong.mean() - error_rate) < 0.03
    assert abs(verbose.mean() - verbose_rate) < 0.026
    # flaws are independent: P(wrong and verbose) ~ 0.06
    assert abs((wrong & verbose).mean() - error_rate * verbose_rate) < 0.02
    scores = tasks.gold_scores(examples, demos)
    assert np.all(scores[~wrong & ~verbose] == 1.0) and np.all(scores[wrong | verbose] < 1.0)
    assert max(len(d.split()) for d in demos) <= 23  # + EOS fits 24 response tokens


def test_demonstrations_extreme_rates_and_determinism():
    examples = tasks.sample_examples(300, seed=2)
    rng = np.random.default_rng(0)
    perfect = [tasks.demonstration(e, rng, error_rate=0.0, verbose_rate=0.0) for e in examples]
    assert perfect == [e.answer for e in examples]
    all_wrong = [tasks.demonstration(e, rng, error_rate=1.0, verbose_rate=0.0) for e in examples]
    assert all(d != e.answer for d, e in zip(all_wrong, examples))

    def demos(seed):
        rng = np.random.default_rng(seed)
        return [tasks.demonstration(e, rng) for e in examples]
    assert demos(4) == demos(4) and demos(4) != demos(5)
    with pytest.raises(ValueError, match="error_rate"):
        tasks.demonstration(examples[0], rng, error_rate=1.5)


# ----------------------------------------------------------------------------- labelers

def test_rank_responses_temperature_zero_sorts_by_gold_ties_by_index():
    rng = np.random.default_rng(0)
    ranking = tasks.rank_responses([0.2, 0.9, 0.5, 0.9], rng, temperature=0.0)
    np.testing.assert_array_equal(ranking, [1, 3, 2, 0])
    np.testing.assert_array_equal(tasks.ranks_from_ranking(ranking), [3, 0, 2, 1])
    for _ in range(20):
        gold = rng.random(4)
        np.testing.assert_array_equal(tasks.rank_responses(gold, rng, 0.0), np.argsort(-gold))
    assert tasks.labeler_agreement([[0.2, 0.9, 0.5, 0.9]], 0.0) == 1.0
    with pytest.raises(ValueError, match="temperature"):
        tasks.rank_responses([0.1, 0.2], rng, temperature=-1.0)


def test_plackett_luce_pair_marginals_are_bradley_terry():
    rng = np.random.default_rng(1)
    gold, temperature, n = np.array([0.1, 0.4, 0.5, 0.9]), 0.2, 20000
    above = np.zeros((4, 4))
    for _ in range(n):
        ranks = tasks.ranks_from_ranking(tasks.rank_responses(gold, rng, temperature))
        above += ranks[:, None] < ranks[None, :]
    expected = 1 / (1 + np.exp(-(gold[:, None] - gold[None, :]) / temperature))
    off_diagonal = ~np.eye(4, dtype=bool)
    # sd of a frequency <= sqrt(.25/20000) = 0.0035
    np.testing.assert_allclose((above / n)[off_diagonal], expected[off_diagonal], atol=0.015)


def test_labeler_agreement_hand_computed_and_monte_carlo():
    # one pair, gold gap 1, T = 1: p = sigmoid(1); agreement = p^2 + (1-p)^2
    p = 1 / (1 + math.exp(-1.0))
    assert tasks.labeler_agreement([[1.0, 0.0]], 1.0) == pytest.approx(p**2 + (1 - p) ** 2)
    assert tasks.bayes_pair_accuracy([[1.0, 0.0]], 1.0) == pytest.approx(p)

    rng = np.random.default_rng(2)
    gold_sets = rng.random((200, 4))
    for temperature in (0.1, 0.3):
        agree = total = 0
        for gold in gold_sets:
            for _ in range(50):
                r1 = tasks.ranks_from_ranking(tasks.rank_responses(gold, rng, temperature))
                r2 = tasks.ranks_from_ranking(tasks.rank_responses(gold, rng, temperature))
                i, j = np.triu_indices(4, k=1)
                agree += np.sum((r1[i] < r1[j]) == (r2[i] < r2[j]))
                total += len(i)
        # 60000 pair comparisons: sd ~ 0.002
        assert agree / total == pytest.approx(tasks.labeler_agreement(gold_sets, temperature),
                                              abs=0.01)
    assert tasks.labeler_agreement(gold_sets, 0.1) > tasks.labeler_agreement(gold_sets, 0.3)
    # near-random labelers: agreement -> 1/2
    assert tasks.labeler_agreement(gold_sets, 1000.0) == pytest.approx(0.5, abs=1e-3)


def test_collect_rankings_zero_temperature_follows_gold():
    examples = tasks.sample_examples(20, seed=7)
    rng = np.random.default_rng(3)
    responses = [[tasks.demonstration(e, rng) for _ in range(4)] for e in examples]
    records = tasks.collect_rankings(examples, responses, rng, temperature=0.0)
    for e, rec in zip(examples, records):
        assert set(rec) == {"prompt", "responses", "ranking"} and rec["prompt"] == e.prompt
        ordered = tasks.gold_scores([e] * 4, [rec["responses"][i] for i in rec["ranking"]])
        assert np.all(np.diff(ordered) <= 0)


# ----------------------------------------------------------------------------- corpus

def test_corpus_is_deterministic_single_line_and_from_train_split():
    docs = tasks.corpus(300, seed=0)
    assert docs == tasks.corpus(300, seed=0) and docs != tasks.corpus(300, seed=1)
    vocabulary = set(tasks.task_words())
    solved = 0
    for doc in docs:
        assert "\n" not in doc and set(doc.split()) <= vocabulary
        for segment in doc.split(" . "):
            if " = " in segment:
                prompt, answer = segment.split(" = ")
                assert answer == _reference_answer(prompt)
                assert tasks.split_of(prompt) == "train"
                solved += 1
    assert solved > 300  # ~2 segments per doc, 70% solved


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tasks.save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) <= 512
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.convert_ids_to_tokens(list(range(6))) == list(tasks.SPECIAL_TOKENS)
    examples = tasks.sample_examples(200, seed=0)
    rng = np.random.default_rng(0)
    texts = tasks.corpus(100, seed=0) + [tasks.demonstration(e, rng) for e in examples]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(ids) == len(text.split())               # one token per word
        assert tok.decode(ids) == text
    prompt, response = examples[0].prompt, examples[0].answer
    dialogue = tasks.format_dialogue(prompt, response)
    ids = tok(dialogue)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == f"{prompt} {response}"
    user = [{"role": "user", "content": prompt}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        tasks.format_prompt(prompt)
    assert tok.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                   tokenize=False) == dialogue


# ----------------------------------------------------------------------------- export

def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_export_task_files_hide_gold_and_round_trip(tmp_path):
    paths = tasks.export_task(tmp_path, seed=1, n_sft=30, n_rm_prompts=10, n_ppo_prompts=12,
                              n_heldout=8, n_corpus=20)
    sft = _read_jsonl(paths["sft"])
    assert len(sft) == 30 and all(set(r) == {"prompt", "response"} for r in sft)
    gold = tasks.load_gold(paths["gold"])
    for name, n in (("rm_prompts", 10), ("ppo_prompts", 12), ("heldout_prompts", 8)):
        rows = _read_jsonl(paths[name])
        assert len(rows) == n and all(set(r) == {"prompt", "id"} for r in rows)
        assert all(gold[r["id"]].prompt == r["prompt"] for r in rows)
    heldout_prompts = {r["prompt"] for r in _read_jsonl(paths["heldout_prompts"])}
    train_prompts = {r["prompt"] for name in ("sft", "rm_prompts", "ppo_prompts")
                     for r in _read_jsonl(paths[name])}
    assert not heldout_prompts & train_prompts
    with open(paths["corpus"], encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 20
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()

    examples = list(gold.values())[:5]
    rng = np.random.default_rng(0)
    records = tasks.collect_rankings(
        examples, [[tasks.demonstration(e, rng) for _ in range(4)] for e in examples], rng, 0.5)
    assert tasks.write_rankings(tmp_path / "rankings.jsonl", records) == 5
    assert _read_jsonl(tmp_path / "rankings.jsonl") == records
    with pytest.raises(ValueError, match="bad.jsonl: ranking record 1"):
        tasks.write_rankings(tmp_path / "bad.jsonl",
                             [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}])
    (tmp_path / "broken_gold.jsonl").write_text('{"id": "x", "prompt": "p"}\n')
    with pytest.raises(ValueError, match="broken_gold.jsonl:1"):
        tasks.load_gold(tmp_path / "broken_gold.jsonl")
