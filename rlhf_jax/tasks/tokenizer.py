"""The task's own word-level tokenizer, built locally and saved in the Hugging Face format.

Every task text is words separated by single spaces (`instructions.task_words`), so a
`tokenizers` WordLevel model over that closed vocabulary gives one token per word, no
unknowns, and an exact encode/decode round trip: answers are <= 12 tokens. Wrapped as a
`PreTrainedTokenizerFast` with a chat template, so `AutoTokenizer.from_pretrained(dir)` loads
it offline.

Chat format (word-level, so the spaces are cosmetic):
    <bos> <user> sort : d a c <assistant> a c d <eos>
"""
from __future__ import annotations

import os
from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.tasks.instructions import task_words

PAD, EOS, BOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<bos>", "<unk>", "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, USER, ASSISTANT)
"""Ids 0..5 in this order: pad = 0 matches `generate(..., pad_id=0)`."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} <user> {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} <assistant> {{ message['content'] }} {{ eos_token }}"
    "{% else %}{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)
"""Jinja chat template (user/assistant turns); `format_prompt`/`format_dialogue` render it in Python."""


def format_prompt(prompt: str) -> str:
    """Text the policy sees before answering; equals the chat template with a generation prompt."""
    return f"{BOS} {USER} {prompt} {ASSISTANT}"


def format_dialogue(prompt: str, response: str) -> str:
    """Prompt plus response and EOS; equals the chat template over a user/assistant pair."""
    return f"{format_prompt(prompt)} {response} {EOS}"


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer: special tokens, then `words` (default `task_words()`, vocab ~140) in order."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(task_words() if words is None else words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        extra_special_tokens={"user_token": USER, "assistant_token": ASSISTANT},
        clean_up_tokenization_spaces=False,  # keep "a , b" as is: decode must round-trip
        padding_side="right", model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(directory: str | os.PathLike, words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer (over `words`, default the instruction task's) and `save_pretrained` it into
    `directory`; returns it."""
    tokenizer = build_tokenizer(words)
    tokenizer.save_pretrained(os.fspath(directory))
    return tokenizer
