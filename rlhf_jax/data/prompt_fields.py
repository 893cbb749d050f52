"""Prompt rows as host reward functions see them: the prompt text and the file's extra columns.

Row i here is row i of the prompt batches (`index` in a "prompts" batch: the record number over
the files in order, blank lines skipped, as `formats.read_records` counts), so a batch's `index`
finds its rows' fields; the data position is checkpointed, so a resumed run sees the same fields.

- prompt text: the `prompt` field, GSM8K's `question`, or the content of the last user message of
  `messages` (without the chat template).
- fields: every other top-level key. Every row must have the same keys. A GSM8K row
  ({"question", "answer"}) gives `answer` = the gold after "####" and `solution` = the worked answer.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.formats import DataError, iter_jsonl
from rlhf_jax.tasks.answers import final_answer

PROMPT_KEYS = ("prompt", "messages", "question")


@dataclasses.dataclass
class PromptRows:
    """Prompt texts `[R]` and extra fields `{name: [R]}` of the prompt files, row-aligned."""

    prompts: list[str]
    fields: dict[str, list]
    source: str = ""  # the files they were read from (comma-separated), for error messages

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: Sequence[int]) -> tuple[list[str], dict[str, list]]:
        """(prompts, fields) of rows `index` (batch order)."""
        rows = [int(i) for i in np.asarray(index)]
        fields = {name: [values[i] for i in rows] for name, values in self.fields.items()}
        return [self.prompts[i] for i in rows], fields


def _prompt_text(path: str, line: int, obj: dict) -> str:
    if "prompt" in obj:
        value, field = obj["prompt"], "prompt"
    elif "question" in obj:
        value, field = obj["question"], "question"
    elif "messages" in obj and isinstance(obj["messages"], list):
        users = [m.get("content") for m in obj["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        value, field = (users[-1] if users else None), "messages"
    else:
        raise DataError(path, line, "prompt", "missing field (or 'question' or 'messages')")
    if not isinstance(value, str):
        raise DataError(path, line, field, "needs a string prompt (a user message for 'messages')")
    return value


def _row_fields(path: str, line: int, obj: dict) -> dict:
    fields = {k: v for k, v in obj.items() if k not in PROMPT_KEYS}
    if "question" in obj and "prompt" not in obj and "answer" in obj:  # GSM8K
        if not isinstance(obj["answer"], str):
            raise DataError(path, line, "answer", "a GSM8K answer must be a string ending in '#### <answer>'")
        gold = final_answer(obj["answer"])
        if gold is None:
            raise DataError(path, line, "answer", "a GSM8K answer must end in '#### <answer>'")
        fields["answer"], fields["solution"] = gold, obj["answer"]
    return fields


def read_prompt_rows(paths: str | Sequence[str]) -> PromptRows:
    """Prompt texts and extra fields of JSONL prompt files (comma-separated or a list), in order.
    Raises `DataError` (file, line, field) for a row without a prompt or with other keys than the
    first row's."""
    paths = [p.strip() for p in paths.split(",") if p.strip()] if isinstance(paths, str) else list(paths)
    prompts: list[str] = []
    fields: dict[str, list] = {}
    names = None
    for path in paths:
        for line, obj in iter_jsonl(path):
            row = _row_fields(path, line, obj)
            if names is None:
                names = sorted(row)
                fields = {name: [] for name in names}
            elif sorted(row) != names:
                extra = sorted(set(row) ^ set(names))
                raise DataError(path, line, extra[0], f"fields {sorted(row)} differ from the first row's {names}; "
                                                      "every prompt row needs the same fields")
            prompts.append(_prompt_text(path, line, obj))
            for name in names:
                fields[name].append(row[name])
    if not prompts:
        raise DataError(", ".join(paths), None, None, "no prompt rows")
    return PromptRows(prompts, fields, ", ".join(paths))
