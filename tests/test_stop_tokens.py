"""One scoring token everywhere, and stop tokens as a set (issue 14).

- The same text scored through RM training's path (ranking batches: RM training, RM evaluation,
  the reward normalisation) and through the RL path (left-padded prompt + the response as the policy
  emits it: rollout scoring, best-of-n, the pipeline's evaluation) gives the same score, read at the
  response's stop token, never at template text after it: ChatML (`<|im_end|>\\n`), Llama-3
  (`<|eot_id|>`, stop set from generation_config.json), the plain built-in template, GPT-2 with
  pad == eos.
- Two stop ids through generation -> RL rollout (masks, missing-EOS reward, eos fraction) ->
  decoding for evaluation.
"""
from __future__ import annotations

import json
import re
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from configs import ppo as ppo_configs
from rlhf_jax import algorithms, evaluation, generation, loading
from rlhf_jax.data import chat, load_split
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.models import reward as reward_lib
from rlhf_jax.trainers import ppo, rl_config

WORDS = "what is two plus three five four it the answer".split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<pad>", "<eos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<unk>"]
PUNCTUATION = ["\n", "\n\n", "?", ".", "<|system|>", "<|user|>", "<|assistant|>", "system", "user", "assistant"]


def word_tokenizer(directory: pathlib.Path, kind: str):
    """A word-level tokenizer saved in HF format and loaded back (so `name_or_path` is its dir):
    "chatml" (Qwen2-Instruct-like: EOS = <|im_end|>), "llama3" (EOS <|eot_id|>, generation_config
    lists <|end_of_text|> too), "plain" (built-in default template), "gpt2" (pad == eos)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + PUNCTUATION + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                     pre_tokenizers.Split(Regex(r"\n+|[?.]"), behavior="isolated")])
    backend.add_special_tokens(SPECIALS)
    kwargs = {"chatml": dict(eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML),
              "llama3": dict(eos_token="<|eot_id|>", pad_token="<pad>", bos_token="<|begin_of_text|>",
                             chat_template=LLAMA3),
              "plain": dict(eos_token="<eos>", pad_token="<pad>"),
              "gpt2": dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")}[kind]
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs).save_pretrained(directory)
    if kind == "llama3":
        (directory / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [vocab["<|end_of_text|>"], vocab["<|eot_id|>"]]}))
    return loading.load_tokenizer(str(directory))


def _tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


@pytest.mark.parametrize("kind", ["chatml", "llama3", "plain", "gpt2"])
def test_rm_training_and_rl_score_the_same_text_at_the_stop_token(kind, tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok", kind)
    prompt = "what is two plus three?"
    chosen, rejected = "the answer is five.", "it is four."
    data = tmp_path / "comparisons.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": prompt}) + "\n")
    stop = chat.stop_ids(tokenizer)
    expected_stop = {"chatml": ["<|im_end|>"], "llama3": ["<|end_of_text|>", "<|eot_id|>"], "plain": ["<eos>"],
                     "gpt2": ["<|endoftext|>"]}[kind]
    assert _tokens(tokenizer, stop) == expected_stop

    # RM training / evaluation / normalisation: the ranking batch, right-padded [P, K, T]
    ranking = load_split("comparisons", str(data), tokenizer, max_len=40, data_dir=str(tmp_path / "tfds"))
    batch = ranking.collate([0])
    ids, mask = batch["input_ids"][0, 0], batch["attention_mask"][0, 0]
    last = int(mask.sum()) - 1
    assert int(ids[last]) in stop, f"{kind}: RM reads its score at {_tokens(tokenizer, [ids[last]])}"
    if kind == "chatml":  # the template's "\n" after <|im_end|> is not part of the response
        assert _tokens(tokenizer, ids[last - 1:last + 1]) == [".", "<|im_end|>"]

    # RL: the left-padded prompt batch + the response as the policy emits it (content + its stop token)
    prompts = load_split("prompts", str(prompts_file), tokenizer, max_len=24, data_dir=str(tmp_path / "tfds"))
    pb = prompts.collate([0])
    content = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    emitted = content + [chat.eos_id(tokenizer)]
    response = np.full((1, 12), chat.pad_id(tokenizer), np.int32)
    response[0, :len(emitted)] = emitted
    response_mask = (np.arange(12) < len(emitted)).astype(np.int32)[None]

    rm = Transformer(TransformerConfig(vocab_size=len(tokenizer), d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                       max_len=64), heads=("value",))
    params = init_params(rm, jax.random.PRNGKey(0))
    norm = {"mean": 0.25, "std": 2.0}
    train_path = reward_lib.ranking_scores(rm, params, batch)[0, 0]
    score_fn = evaluation.make_score_fn(rm, norm)  # best-of-n and the pipeline's evaluation
    eval_path = score_fn(params, pb["prompt_ids"], pb["prompt_mask"], response, response_mask)[0]
    seq_ids = jnp.concatenate([pb["prompt_ids"], response], 1)  # the rollout's layout (algorithms.rollout)
    seq_mask = jnp.concatenate([pb["prompt_mask"], response_mask], 1)
    rl_path = reward_lib.score(rm, params, norm, seq_ids, seq_mask)[0]
    # same text: the ranking row is exactly prompt + emitted response
    np.testing.assert_array_equal(ids[:last + 1], np.concatenate([pb["prompt_ids"][0][pb["prompt_mask"][0] > 0],
                                                                  emitted]))
    np.testing.assert_allclose((train_path - norm["mean"]) / norm["std"], rl_path, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eval_path, rl_path, rtol=1e-5, atol=1e-6)


def test_stop_ids_normalisation_and_errors(tmp_path):
    assert generation.stop_ids(None) == () and generation.stop_ids(-1) == ()
    assert generation.stop_ids(7) == (7,) and generation.stop_ids([9, 3, 9]) == (3, 9)
    with pytest.raises(ValueError, match=r"eos_id='x'"):
        generation.stop_ids("x")
    config = ppo_configs.get_config("tiny")
    config.rollout.eos_id = [1, "2"]
    with pytest.raises(ValueError, match=r"^config\.rollout\.eos_id=\[1, '2'\]"):
        rl_config.rollout_stop_ids(config)
    tokenizer = word_tokenizer(tmp_path / "tok", "llama3")
    config.rollout.update(eos_id=int(tokenizer.eos_token_id), pad_id=int(tokenizer.pad_token_id))
    stop = list(chat.stop_ids(tokenizer))
    with pytest.raises(ValueError, match=re.escape(f"tokenizer's stop ids are {stop} (set --config.rollout.eos_id={stop})")):
        rl_config.check_special_tokens(config.rollout, tokenizer, "config.rollout")
    config.rollout.eos_id = stop[::-1]  # the order does not matter
    rl_config.check_special_tokens(config.rollout, tokenizer, "config.rollout")
    loading.save_tokenizer(tokenizer, str(tmp_path / "run"))  # a stage's copy keeps the stop set
    assert list(chat.stop_ids(loading.load_tokenizer(str(tmp_path / "run")))) == stop
    (tmp_path / "tok" / "generation_config.json").write_text('{"eos_token_id": ["x"]}')
    with pytest.raises(ValueError, match=r"generation_config.json: field eos_token_id"):
        chat.stop_ids(loading.load_tokenizer(str(tmp_path / "tok")))


def _expected_mask(tokens: np.ndarray, stop) -> np.ndarray:
    """1 up to and including the first stop token of each row (independent of generation.is_stop)."""
    out = np.zeros_like(tokens)
    for r, row in enumerate(tokens.tolist()):
        ends = [i for i, t in enumerate(row) if t in stop]
        out[r, :ends[0] + 1 if ends else len(row)] = 1
    return out


def test_generation_stops_at_any_of_two_stop_ids():
    model = Transformer(TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=32),
                        heads=("lm",))
    params = init_params(model, jax.random.PRNGKey(1))
    prompt_ids = jnp.tile(jnp.arange(3, 7, dtype=jnp.int32), (32, 1))
    prompt_mask = jnp.ones_like(prompt_ids)
    common = dict(max_new_tokens=12, temperature=1.0, pad_id=0)
    free = generation.generate(model, params, prompt_ids, prompt_mask, jax.random.PRNGKey(2), eos_id=None, **common)
    stopped = generation.generate(model, params, prompt_ids, prompt_mask, jax.random.PRNGKey(2), eos_id=[2, 5],
                                  **common)
    free_tokens, tokens, mask = map(np.asarray, (free.tokens, stopped.tokens, stopped.mask))
    expected = _expected_mask(free_tokens, {2, 5})  # the same draws until a row stops
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(tokens[mask > 0], free_tokens[mask > 0])
    assert (tokens[mask == 0] == 0).all() and (np.asarray(stopped.logprobs)[mask == 0] == 0).all()
    last = tokens[np.arange(32), mask.sum(1) - 1]
    assert {2, 5} <= set(last.tolist()), "both stop ids should end some row (seeded)"

    class Detok:  # decoding for evaluation cuts at whichever stop token came first
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    texts = evaluation.decode_responses(Detok(), tokens, mask, (2, 5))
    for row, text in zip(tokens.tolist(), texts):
        n = next((i for i, t in enumerate(row) if t in (2, 5)), len(row))
        assert text == " ".join(map(str, row[:n]))


def test_rl_rollout_with_two_stop_ids():
    config = ppo_configs.get_config("tiny")
    config.update_from_flattened_dict({"rollout.eos_id": [1, 2], "rollout.batch_size": 32,
                                       "rollout.max_new_tokens": 12, "rewards.rules.missing_eos.weight": 1.0,
                                       "rewards.rules.target_token.weight": 0.0, "fast_compile": True})
    mesh = loading.single_device_mesh()
    models = ppo.build_models(config)
    optimizers = ppo.make_optimizers(config, models)
    state_sh = algorithms.state_shardings(models, optimizers, mesh, ema=False, penalty=False)
    state = ppo.initial_state(config, models, optimizers, state_sh)
    settings = ppo.settings_from_config(config)
    assert settings.sampling.eos_id == (1, 2)
    prompts = next(ppo.iteration_batches(*ppo.make_data(config, "unused"), group_size=1))["prompts"]
    assert not np.isin(prompts["prompt_ids"][prompts["prompt_mask"] > 0], [0, 1, 2]).any()  # reserved ids
    experience, metrics = jax.jit(algorithms.rollout, static_argnums=(0, 1))(
        models, settings, state, prompts, jax.random.PRNGKey(3))
    tokens, mask = np.asarray(experience.tokens), np.asarray(experience.mask)
    np.testing.assert_array_equal(mask, _expected_mask(tokens, {1, 2}))
    ended = np.array([bool({1, 2} & set(row[m > 0].tolist())) for row, m in zip(tokens, mask)])
    assert 0 < ended.mean() < 1
    last = tokens[np.arange(32), mask.sum(1) - 1]
    assert {1, 2} <= set(last[ended].tolist())
    np.testing.assert_allclose(float(metrics["response/eos_fraction"]), ended.mean())
    np.testing.assert_allclose(np.asarray(experience.scores), np.where(ended, 0.0, -1.0))  # missing-EOS rule
