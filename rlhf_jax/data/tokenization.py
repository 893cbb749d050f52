"""Normalized records -> fixed-budget token examples for the three batch formats.

Truncation (`truncate=True`): the prompt loses tokens from the LEFT (the most recent context is
kept; a leading BOS is kept too), responses lose tokens from the RIGHT. The prompt keeps
    p = min(len(prompt), max(max_len - longest response, max_prompt_len))
tokens: it is cut only as far as the responses need, but never below `max_prompt_len`; each
response then keeps min(len(response), max_len - p) tokens. With `truncate=False` a row that does
not fit is dropped instead. Every dropped row is counted under a reason:
- "too_long": does not fit and truncate=False;
- "tied_responses": a ranking row with two identical responses (after truncation), which carries
  no preference.
`DataStats` counts those drops and the rows whose prompt or a response was cut (for the data
summary every stage prints: `dataset.TokenizedSplit.summary`).
Examples (numpy, int32):
- "lm":      {"input_ids" [n], "loss_mask" [n]} (loss on assistant tokens), "index"
- "ranking": {"input_ids": [K arrays], "loss_mask": [K arrays] (response targets), "ranks" [K]}, "index"
- "prompts": {"prompt_ids" [p]}, "index"
Text corpora are packed for language modelling: documents + EOS concatenated and cut into
blocks of max_len tokens (the last block may be shorter); no document is dropped.
"""
from __future__ import annotations

import collections

import numpy as np

from rlhf_jax.data import chat

BATCH_FORMATS = ("lm", "ranking", "prompts")


def truncation_budget(prompt_len: int, response_len: int, max_len: int, max_prompt_len: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) under the rule in the module docstring."""
    keep_prompt = min(prompt_len, max(max_len - response_len, max_prompt_len))
    return keep_prompt, min(response_len, max_len - keep_prompt)


def left_truncate(ids: np.ndarray, keep: int, bos: int | None = None) -> np.ndarray:
    """The last `keep` tokens; a leading BOS survives (it replaces the oldest kept token)."""
    return ids[kept_positions(ids, keep, bos)]


def kept_positions(ids: np.ndarray, keep: int, bos: int | None = None) -> np.ndarray:
    """Positions of `ids` that left truncation to `keep` tokens keeps (see left_truncate)."""
    n = len(ids)
    if n <= keep:
        return np.arange(n)
    if bos is not None and keep > 0 and ids[0] == bos:
        return np.concatenate([[0], np.arange(n - keep + 1, n)]).astype(np.int64)
    return np.arange(n - keep, n)


class DataStats:
    """Counts dropped rows per reason (remembering their source lines), rows whose prompt or
    response(s) were truncated, the longest prompt / response seen (tokens) and the smallest and
    largest response budget of a cut row (max_len minus its kept prompt)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.lines = collections.defaultdict(list)
        self.truncated = collections.Counter()  # "prompt" / "response": rows cut
        self.longest = collections.Counter()  # "prompt" / "response": tokens before truncation
        self.response_budget: tuple[int, int] | None = None  # (min, max) tokens a cut response kept

    def drop(self, reason: str, line: int) -> None:
        self.counts[reason] += 1
        self.lines[reason].append(line)

    def seen(self, prompt_len: int, response_len: int = 0, keep_prompt: int | None = None,
             keep_response: int | None = None) -> None:
        """One kept row: its lengths before truncation and what was kept (None = all)."""
        self.longest["prompt"] = max(self.longest["prompt"], prompt_len)
        self.longest["response"] = max(self.longest["response"], response_len)
        self.truncated["prompt"] += keep_prompt is not None and keep_prompt < prompt_len
        if keep_response is not None and keep_response < response_len:
            self.truncated["response"] += 1
            low, high = self.response_budget or (keep_response, keep_response)
            self.response_budget = (min(low, keep_response), max(high, keep_response))


def _bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id


class RowError(ValueError):
    """A record the chat template cannot render (e.g. a role it does not know): its 1-based `line`
    and the `problem`; `data.dataset` adds the file (formats.DataError)."""

    def __init__(self, line: int, problem: str):
        self.line, self.problem = line, problem
        super().__init__(f"line {line}: {problem}")


def _segments(record: dict, render, *args):
    """`render(*args)` (chat.prompt_segments / response_segments), its failure a RowError naming the row."""
    from jinja2.exceptions import TemplateError

    try:
        return render(*args)
    except (TemplateError, ValueError) as error:
        raise RowError(record["line"], f"the chat template cannot render this row's messages: {error}") from None


def tokenize_chat(records: list[dict], tokenizer, template: str, with_responses: bool):
    """Each record -> (prompt ids, prompt target flags, [response ids], [response target flags]);
    RowError for a record the template cannot render."""
    prompt_rows = [_segments(r, chat.prompt_segments, tokenizer, r["messages"], template) for r in records]
    prompts = chat.tokenize_segments(tokenizer, prompt_rows)
    if not with_responses:
        return [(p, t, [], []) for p, t in prompts]
    response_rows = [_segments(r, chat.response_segments, tokenizer, r["messages"], resp, template)
                     for r in records for resp in r["responses"]]
    eos, stop = chat.eos_id(tokenizer), chat.stop_ids(tokenizer)
    responses = iter(chat.end_response(ids, t, stop, eos) for ids, t in chat.tokenize_segments(tokenizer, response_rows))
    out = []
    for (p, t), r in zip(prompts, records):
        pairs = [next(responses) for _ in r["responses"]]
        out.append((p, t, [ids for ids, _ in pairs], [tm for _, tm in pairs]))
    return out


def lm_examples(records, tokenizer, template, max_len, max_prompt_len, truncate, drops: DataStats):
    """Prompt + best (rank 0) response; loss on every assistant token (earlier turns included)."""
    out = []
    for r, (p, pt, responses, rts) in zip(records, tokenize_chat(records, tokenizer, template, True)):
        best = int(np.argmin(r["ranks"]))
        resp, rt = responses[best], rts[best]
        if len(p) + len(resp) > max_len and not truncate:
            drops.drop("too_long", r["line"])
            continue
        keep_p, keep_r = truncation_budget(len(p), len(resp), max_len, max_prompt_len)
        drops.seen(len(p), len(resp), keep_p, keep_r)
        kept = kept_positions(p, keep_p, _bos_id(tokenizer))
        p2, pt2 = p[kept], pt[kept]
        out.append({"input_ids": np.concatenate([p2, resp[:keep_r]]).astype(np.int32),
                    "loss_mask": np.concatenate([pt2, rt[:keep_r]]).astype(np.int32),
                    "index": np.int32(r["index"])})
    return out


def ranking_examples(records, tokenizer, template, max_len, max_prompt_len, truncate, drops: DataStats):
    """Prompt + each of the K responses, all with the same (truncated) prompt; `loss_mask` marks
    each response's target tokens (0 on the prompt), the tokens whose log-probs DPO sums."""
    out = []
    for r, (p, _, responses, rts) in zip(records, tokenize_chat(records, tokenizer, template, True)):
        longest = max(len(x) for x in responses)
        if len(p) + longest > max_len and not truncate:
            drops.drop("too_long", r["line"])
            continue
        keep_p, keep_r = truncation_budget(len(p), longest, max_len, max_prompt_len)
        p2 = left_truncate(p, keep_p, _bos_id(tokenizer))
        seqs = [np.concatenate([p2, x[:keep_r]]).astype(np.int32) for x in responses]
        if len({s.tobytes() for s in seqs}) < len(seqs):
            drops.drop("tied_responses", r["line"])
            continue
        drops.seen(len(p), longest, keep_p, keep_r)
        targets = [np.concatenate([np.zeros(len(p2), np.int32), t[:keep_r]]).astype(np.int32) for t in rts]
        out.append({"input_ids": seqs, "loss_mask": targets, "ranks": np.asarray(r["ranks"], np.int32),
                    "index": np.int32(r["index"])})
    return out


def prompt_examples(records, tokenizer, template, max_prompt_len, truncate, drops: DataStats):
    """The dialogue up to the generation prompt, left-truncated to max_prompt_len."""
    out = []
    for r, (p, _, _, _) in zip(records, tokenize_chat(records, tokenizer, template, False)):
        if len(p) > max_prompt_len and not truncate:
            drops.drop("too_long", r["line"])
            continue
        drops.seen(len(p), 0, min(len(p), max_prompt_len))
        out.append({"prompt_ids": left_truncate(p, max_prompt_len, _bos_id(tokenizer)).astype(np.int32),
                    "index": np.int32(r["index"])})
    return out


def packed_text_examples(records, tokenizer, max_len):
    """Documents + EOS, concatenated and cut into max_len blocks; loss on every real token."""
    eos = chat.eos_id(tokenizer)
    docs = tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    stream = np.asarray([t for doc in docs for t in (*doc, eos)], np.int32)
    return [{"input_ids": stream[s:s + max_len], "loss_mask": np.ones(len(stream[s:s + max_len]), np.int32),
             "index": np.int32(s // max_len)} for s in range(0, len(stream), max_len)]
