"""Parsing user files into normalized records, with errors that name file, line and field.

Every chat-shaped file (demonstrations, comparisons, rankings, prompts, HH-RLHF) becomes records
    {"index": row number from 0, "line": 1-based line in the file,
     "messages": [{"role", "content"}, ...]   the prompt: every turn before the final response,
     "responses": [str, ...], "ranks": [int, ...]}   rank 0 = best
and a plain-text corpus becomes records {"index", "line", "text"}.

Accepted JSONL lines (files may be gzipped: *.gz). Blank lines are skipped; extra fields ignored.
- demonstrations: {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]}
  whose last message is from the assistant (that turn is the response; earlier assistant turns
  stay in the prompt and are SFT targets too).
- comparisons: {"prompt" | "messages", "chosen": str, "rejected": str}.
- rankings: {"prompt" | "messages", "responses": [str, ...], "ranking": [int, ...]} where
  `ranking` lists indices into `responses`, BEST FIRST (a permutation); every line of a file must
  have the same number K >= 2 of responses (ranking batches have a fixed K).
- prompts: {"prompt": str} or {"messages": [...]} not ending with an assistant turn.
- GSM8K (Cobbe et al. 2021): {"question": str, "answer": str} is a demonstration (the question as
  the user turn, the worked solution ending in "#### <final answer>" as the response) and a
  prompt (the question; `rlhf_jax.data.prompt_fields` gives reward functions the gold after "####").
- hh: Anthropic HH-RLHF {"chosen": str, "rejected": str}, two full transcripts of
  "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. The transcripts share everything up to the
  last "\\n\\nAssistant:" marker inside their common prefix: that shared dialogue is the
  multi-turn prompt, the rest of each transcript is the chosen / rejected response (stripped).
Roles are "system", "user", "assistant". A plain-text corpus ("text") holds one document per
block of lines separated by blank lines (text_separator="blank_line", the default) or one document
per line (text_separator="line").
"""
from __future__ import annotations

import gzip
import json
import os
import re
from typing import Any, Iterator

KINDS = ("demonstrations", "comparisons", "rankings", "prompts", "hh", "text")
ROLES = ("system", "user", "assistant")
TEXT_SEPARATORS = ("blank_line", "line")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
    """Bad input data; the message names the file, the 1-based line and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}, line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


def open_binary(path: str):
    """Opens a file for reading bytes, gunzipping it when the name ends with .gz."""
    if not os.path.isfile(path):
        raise DataError(path, None, None, "file not found")
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, UTF-8 line without its newline); bad bytes name their line."""
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, JSON object) for each non-blank line."""
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(path, line_no, None, f"expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


# ----------------------------------------------------------------------------------------------
# Field access
# ----------------------------------------------------------------------------------------------
class _Row:
    """A JSON object plus where it came from, so every field error names file, line and field."""

    def __init__(self, path: str, line: int, obj: dict):
        self.path, self.line, self.obj = path, line, obj

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(self.path, self.line, field, problem)

    def get(self, field: str, kind: type | tuple[type, ...], hint: str = "") -> Any:
        if field not in self.obj:
            raise self.error(field, f"missing field{hint}")
        return self.typed(field, self.obj[field], kind)

    def typed(self, field: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(field, f"must be {want}, got {_TYPE_NAMES.get(type(value), type(value).__name__)}")
        return value


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


def _messages(row: _Row, field: str = "messages") -> list[dict]:
    """A non-empty list of {"role": one of ROLES, "content": str}."""
    raw = row.get(field, list)
    if not raw:
        raise row.error(field, "must not be empty")
    out = []
    for i, m in enumerate(raw):
        name = f"{field}[{i}]"
        row.typed(name, m, dict)
        if "role" not in m or "content" not in m:
            raise row.error(name, "each message needs 'role' and 'content'")
        role = row.typed(f"{name}.role", m["role"], str)
        if role not in ROLES:
            raise row.error(f"{name}.role", f"unknown role {role!r}; expected one of {ROLES}")
        out.append({"role": role, "content": row.typed(f"{name}.content", m["content"], str)})
    return out


def _prompt_turns(row: _Row) -> list[dict]:
    """The prompt dialogue from `messages` (must not end with the assistant) or `prompt`."""
    if "messages" in row.obj:
        turns = _messages(row)
        if turns[-1]["role"] == "assistant":
            raise row.error("messages", "a prompt must not end with an assistant message")
        return turns
    if "prompt" not in row.obj and "question" in row.obj:  # GSM8K
        return [{"role": "user", "content": row.get("question", str)}]
    return [{"role": "user", "content": row.get("prompt", str, " (or 'messages')")}]


# ----------------------------------------------------------------------------------------------
# One parser per kind: _Row -> (messages, responses, ranks)
# ----------------------------------------------------------------------------------------------
def parse_demonstration(row: _Row):
    if "messages" in row.obj:
        turns = _messages(row)
        if turns[-1]["role"] != "assistant":
            raise row.error("messages", "the last message must be from the assistant (the response)")
        return turns[:-1], [turns[-1]["content"]], [0]
    if "prompt" not in row.obj and "question" in row.obj:  # GSM8K: the worked solution is the response
        return [{"role": "user", "content": row.get("question", str)}], [row.get("answer", str)], [0]
    prompt = row.get("prompt", str, " (or 'messages')")
    return [{"role": "user", "content": prompt}], [row.get("response", str)], [0]


def parse_comparison(row: _Row):
    turns = _prompt_turns(row)
    return turns, [row.get("chosen", str), row.get("rejected", str)], [0, 1]


def ranks_from_ranking(ranking: list[int]) -> list[int]:
    """Best-first indices -> rank of each response (0 = best): ranks[ranking[j]] = j."""
    ranks = [0] * len(ranking)
    for position, i in enumerate(ranking):
        ranks[i] = position
    return ranks


def parse_ranking(row: _Row):
    turns = _prompt_turns(row)
    responses = row.get("responses", list)
    for i, r in enumerate(responses):
        row.typed(f"responses[{i}]", r, str)
    if len(responses) < 2:
        raise row.error("responses", f"needs at least 2 responses, got {len(responses)}")
    ranking = row.get("ranking", list)
    for i, r in enumerate(ranking):
        row.typed(f"ranking[{i}]", r, int)
    if sorted(ranking) != list(range(len(responses))):
        raise row.error("ranking", f"must list every index 0..{len(responses) - 1} of 'responses' once, "
                                   f"best first; got {ranking}")
    return turns, responses, ranks_from_ranking(ranking)


def parse_prompt(row: _Row):
    return _prompt_turns(row), [], []


def split_hh_transcripts(row: _Row, chosen: str, rejected: str):
    """Shared dialogue prefix -> prompt turns; what follows the last shared assistant marker ->
    the two responses. See the module docstring."""
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise row.error("chosen", "chosen and rejected share no '\\n\\nAssistant:' turn")
    parts = _HH_TURN.split(chosen[:cut])
    if parts[0].strip() or len(parts) < 3:
        raise row.error("chosen", "a transcript must start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    start = cut + len(HH_ASSISTANT)
    return turns, [chosen[start:].strip(), rejected[start:].strip()], [0, 1]


def parse_hh(row: _Row):
    return split_hh_transcripts(row, row.get("chosen", str), row.get("rejected", str))


PARSERS = {"demonstrations": parse_demonstration, "comparisons": parse_comparison,
           "rankings": parse_ranking, "prompts": parse_prompt, "hh": parse_hh}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    return kind


def read_chat_records(kind: str, path: str, first_index: int = 0) -> Iterator[dict]:
    """Parses a JSONL file of one chat kind into normalized records (see the module docstring)."""
    parse = PARSERS[check_kind(kind)]
    num_responses = None
    index = first_index
    for line_no, obj in iter_jsonl(path):
        row = _Row(path, line_no, obj)
        messages, responses, ranks = parse(row)
        if kind == "rankings":
            num_responses = num_responses or len(responses)
            if len(responses) != num_responses:
                raise row.error("responses", f"has {len(responses)} responses but earlier lines have "
                                             f"{num_responses}; every line needs the same K")
        yield {"index": index, "line": line_no, "messages": messages, "responses": responses, "ranks": ranks}
        index += 1


def read_text_records(path: str, separator: str = "blank_line", first_index: int = 0) -> Iterator[dict]:
    """Splits a text corpus into documents: blank-line separated blocks, or one per line."""
    if separator not in TEXT_SEPARATORS:
        raise ValueError(f"text_separator must be one of {TEXT_SEPARATORS}, got {separator!r}")
    index, block, block_line = first_index, [], 0
    for line_no, line in iter_lines(path):
        if line.strip():
            block_line = block_line or line_no
            block.append(line)
        if block and (separator == "line" or not line.strip()):
            yield {"index": index, "line": block_line, "text": "\n".join(block)}
            index, block, block_line = index + 1, [], 0
    if block:
        yield {"index": index, "line": block_line, "text": "\n".join(block)}


def read_records(kind: str, paths: list[str], text_separator: str = "blank_line") -> Iterator[dict]:
    """All records of `paths` in file order, `index` running on across files."""
    index = 0
    for path in paths:
        records = (read_text_records(path, text_separator, index) if kind == "text"
                   else read_chat_records(kind, path, index))
        for record in records:
            yield record
            index += 1
