"""Chat formatting: dialogue -> token ids plus a per-token "is an assistant target" flag.

A dialogue is rendered into *segments*, each a piece of text (or one special token id) with a
target flag; each piece is tokenized on its own and the ids concatenated. Prompt and response are
therefore tokenized identically in SFT, reward modelling and PPO (the tokens the policy is trained
on are the tokens it is prompted with), at the cost of no BPE merges across segment boundaries.

Templates (`template=`):
- "auto": the tokenizer's own `chat_template` when it has one (`apply_chat_template`), else
  "default". With a tokenizer template, segments are differences of rendered prefixes: the
  assistant header is render(turns[:i], add_generation_prompt=True) minus render(turns[:i]), the
  assistant target is render(turns[:i+1]) minus that (content + the template's end-of-turn).
- "default":  "<|system|>\\n{c}\\n" "<|user|>\\n{c}\\n" "<|assistant|>\\n{c}<eos>" and the
  generation prompt "<|assistant|>\\n"; the assistant content and EOS are targets.
- "hh": Anthropic HH style "\\n\\nHuman: {c}" "\\n\\nAssistant: {c}<eos>", generation prompt
  "\\n\\nAssistant: " (for base models and the HH-RLHF data).
- "raw": contents concatenated with no headers, EOS after each assistant turn (completion data).
The text templates start with BOS when the tokenizer has one distinct from EOS (Llama); GPT-2 and
Qwen2 have none. Only assistant turns are targets, so an SFT loss over a multi-turn dialogue
covers every assistant turn and nothing else.

The response ends where the policy stops: at its first stop token (`stop_ids`: the tokenizer's EOS
plus the `eos_token_id` list of a `generation_config.json` beside it, e.g. ChatML's `<|im_end|>`,
Llama-3's `<|eot_id|>` / `<|end_of_text|>`). `end_response` cuts what a chat template writes after it
(ChatML's "\n") and appends EOS to a response without one, so SFT targets, the RM's scoring token
(the last real token) and the RL rollout's last token are the same token.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence, Union

import numpy as np

TEMPLATES = ("auto", "default", "hh", "raw")

Segment = tuple[Union[str, int], bool]  # (text or a single token id, is_target)


@dataclasses.dataclass(frozen=True)
class TextTemplate:
    """Role headers written before each turn and separators written after non-assistant turns."""

    headers: dict
    turn_end: dict


TEXT_TEMPLATES = {
    "default": TextTemplate(headers={"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
                            turn_end={"system": "\n", "user": "\n"}),
    "hh": TextTemplate(headers={"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "},
                       turn_end={"system": "", "user": ""}),
    "raw": TextTemplate(headers={"system": "", "user": "", "assistant": ""}, turn_end={"system": "", "user": ""}),
}


def resolve_template(tokenizer, template: str) -> str:
    """"auto" -> "chat_template" when the tokenizer has one, else "default"."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "default"
    return template


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; responses need an EOS (set tokenizer.eos_token)")
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a response, sorted: the tokenizer's EOS plus `eos_token_id` (an int or a list)
    of a `generation_config.json` in the directory the tokenizer was loaded from (HF chat models list
    their end-of-turn tokens there). ValueError naming the file if that field is malformed."""
    ids = {eos_id(tokenizer)}
    file = pathlib.Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    if file.is_file():
        listed = json.loads(file.read_text()).get("eos_token_id")
        listed = [listed] if isinstance(listed, int) else listed or []
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise ValueError(f"{file}: field eos_token_id={listed!r} is not a token id or a list of them")
        ids.update(listed)
    return tuple(sorted(ids))


def pad_id(tokenizer) -> int:
    """pad_token_id, else eos_token_id (the usual choice for GPT-2-like tokenizers)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer))


def _bos(tokenizer) -> list[Segment]:
    bos = tokenizer.bos_token_id
    return [(int(bos), False)] if bos is not None and bos != tokenizer.eos_token_id else []


# ----------------------------------------------------------------------------------------------
# Text templates
# ----------------------------------------------------------------------------------------------
def _text_prompt(tokenizer, t: TextTemplate, turns: Sequence[dict]) -> list[Segment]:
    segments = _bos(tokenizer)
    for m in turns:
        segments.append((t.headers[m["role"]], False))
        if m["role"] == "assistant":
            segments += [(m["content"], True), (eos_id(tokenizer), True)]
        else:
            segments.append((m["content"] + t.turn_end[m["role"]], False))
    segments.append((t.headers["assistant"], False))
    return segments


# ----------------------------------------------------------------------------------------------
# The tokenizer's own chat template
# ----------------------------------------------------------------------------------------------
def _render(tokenizer, turns: Sequence[dict], generation_prompt: bool) -> str:
    if not turns and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)


def _suffix(longer: str, prefix: str, what: str) -> str:
    if not longer.startswith(prefix):
        raise ValueError(f"the tokenizer's chat template does not render {what} as an extension of the "
                         "shorter dialogue, so turns cannot be masked; use template='default'")
    return longer[len(prefix):]


def _chat_prompt(tokenizer, turns: Sequence[dict]) -> list[Segment]:
    segments, before = [], ""
    for i, m in enumerate(turns):
        full = _render(tokenizer, turns[: i + 1], False)
        if m["role"] == "assistant":
            head = _render(tokenizer, turns[:i], True)
            segments += [(_suffix(head, before, "the generation prompt"), False),
                         (_suffix(full, head, "an assistant turn"), True)]
        else:
            segments.append((_suffix(full, before, f"turn {i}"), False))
        before = full
    segments.append((_suffix(_render(tokenizer, turns, True), before, "the generation prompt"), False))
    return segments


# ----------------------------------------------------------------------------------------------
# Public: prompt / response segments
# ----------------------------------------------------------------------------------------------
def prompt_segments(tokenizer, turns: Sequence[dict], template: str) -> list[Segment]:
    """Every turn of `turns` then the assistant generation prompt; assistant turns are targets."""
    template = resolve_template(tokenizer, template)
    if template == "chat_template":
        return _chat_prompt(tokenizer, turns)
    return _text_prompt(tokenizer, TEXT_TEMPLATES[template], turns)


def response_segments(tokenizer, turns: Sequence[dict], response: str, template: str) -> list[Segment]:
    """The final assistant turn after the generation prompt of `turns`; all targets, EOS last."""
    template = resolve_template(tokenizer, template)
    if template == "chat_template":
        head = _render(tokenizer, turns, True)
        full = _render(tokenizer, [*turns, {"role": "assistant", "content": response}], False)
        return [(_suffix(full, head, "the final assistant turn"), True)]
    return [(response, True), (eos_id(tokenizer), True)]


def tokenize_segments(tokenizer, rows: Sequence[Sequence[Segment]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments -> (ids int32 [n], targets bool [n]) per row; one batched tokenizer call."""
    pieces = sorted({p for row in rows for p, _ in row if isinstance(p, str) and p})
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    ids_of = dict(zip(pieces, encoded))
    out = []
    for row in rows:
        ids, targets = [], []
        for piece, is_target in row:
            piece_ids = [piece] if isinstance(piece, int) else ids_of.get(piece, [])
            ids += piece_ids
            targets += [is_target] * len(piece_ids)
        out.append((np.asarray(ids, np.int32), np.asarray(targets, bool)))
    return out


def end_response(ids: np.ndarray, targets: np.ndarray, stop: Sequence[int], eos: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A response `ids [n]` / `targets [n]` cut after its first stop token (template text after it,
    such as ChatML's "\n", is not part of what the policy emits), or with EOS appended (as a
    target) when it has none."""
    hits = np.flatnonzero(np.isin(ids, np.asarray(stop, ids.dtype)))
    if len(hits):
        return ids[: hits[0] + 1], targets[: hits[0] + 1]
    return np.append(ids, np.int32(eos)), np.append(targets, True)
