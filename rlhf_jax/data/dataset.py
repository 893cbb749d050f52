"""`load_split`: files -> TFDS array_record -> tokenized examples -> batch iterator."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rlhf_jax.data import batching, builders, chat, formats, tokenization
from rlhf_jax.data.iterator import BatchIterator

BATCH_FORMATS = tokenization.BATCH_FORMATS
DEFAULT_BATCH_FORMAT = {"demonstrations": "lm", "text": "lm", "comparisons": "ranking", "rankings": "ranking",
                        "hh": "ranking", "prompts": "prompts"}


class TokenizedSplit:
    """Tokenized examples of one split, with random access and a checkpointable iterator.

    `split[i]` is the i-th kept example (dict of numpy arrays, see tokenization.py);
    `split.record(i)` its parsed source record, read back from the array_record file;
    `split.num_dropped` / `split.drop_counts` / `split.dropped_lines` account for dropped rows;
    `split.summary()` / `split.warnings()` describe the data (rows, drops, truncation, unknown
    tokens). `split.collate(rows)` pads examples into a batch.
    """

    def __init__(self, *, kind, batch_format, paths, source, examples, drops, max_len, max_prompt_len, pad_id,
                 num_responses, num_source_rows, template="", unk_token=None, unk_id=None):
        self.kind, self.batch_format, self.paths, self.source = kind, batch_format, paths, source
        self.examples, self.max_len, self.max_prompt_len, self.pad_id = examples, max_len, max_prompt_len, pad_id
        self.num_responses, self.num_source_rows = num_responses, num_source_rows
        self.drop_counts = dict(drops.counts)
        self.dropped_lines = {k: list(v) for k, v in drops.lines.items()}
        self.num_dropped = int(sum(drops.counts.values()))
        self.template, self.unk_token = template, unk_token
        self.truncated, self.longest = dict(drops.truncated), dict(drops.longest)
        self.response_budget = drops.response_budget  # (min, max) tokens a truncated response kept, or None
        self.num_tokens, self.num_unk = token_counts(examples, unk_id)

    def summary(self) -> dict:
        """What was read and what was done to it: files, kind, template, rows read / kept, drops by
        reason, rows with a truncated prompt / response (count and % of kept rows), longest prompt and
        response before truncation (tokens), the smallest / largest budget a truncated response had
        (max_len minus its kept prompt; 0 when none was cut), tokens and the share mapped to the
        unknown token. A text corpus is packed: its rows become `packed_sequences` sequences of up to
        max_len tokens (`rows_kept` counts those sequences; None for other kinds)."""
        kept = len(self.examples)
        pct = lambda n, total: round(100.0 * n / max(total, 1), 2)  # noqa: E731
        budget = self.response_budget or (0, 0)
        return {"files": self.paths, "kind": self.kind, "batch_format": self.batch_format, "template": self.template,
                "rows_read": self.num_source_rows, "rows_kept": kept, "dropped": self.drop_counts,
                "dropped_pct": pct(self.num_dropped, self.num_source_rows),
                "prompts_truncated": self.truncated.get("prompt", 0),
                "prompts_truncated_pct": pct(self.truncated.get("prompt", 0), kept),
                "responses_truncated": self.truncated.get("response", 0),
                "responses_truncated_pct": pct(self.truncated.get("response", 0), kept),
                "longest_prompt": self.longest.get("prompt", 0), "longest_response": self.longest.get("response", 0),
                "response_budget_min": budget[0], "response_budget_max": budget[1],
                "max_len": self.max_len, "max_prompt_len": self.max_prompt_len, "tokens": self.num_tokens,
                "unk_tokens": self.num_unk, "unk_pct": pct(self.num_unk, self.num_tokens),
                "packed_sequences": kept if self.kind == "text" else None}

    def warnings(self, length_keys: str | tuple[str, str] = ("max_len", "max_prompt_len")) -> list[str]:
        """One line per problem, each with its fix: more than 5% of rows dropped or with a truncated
        prompt / response, more than 1% of tokens mapped to the unknown token. `length_keys` names the
        settings of the budgets: a pair (the max_len key, the max_prompt_len key), e.g.
        ("config.data.max_len", "config.data.max_prompt_len"), or one key for them all (prompt
        batches: "config.rollout.prompt_len"). A response's budget is max_len minus its kept prompt."""
        s, where, out = self.summary(), ", ".join(self.paths), []
        pair = not isinstance(length_keys, str)
        raise_keys = " / ".join(length_keys) if pair else length_keys
        if s["dropped_pct"] > 5:
            fixes = {"tied_responses": "a ranking row with identical responses carries no preference: write distinct "
                                       "responses", "too_long": f"raise {raise_keys} or allow truncation"}
            out.append(f"{where}: {s['dropped_pct']}% of rows dropped {s['dropped']} ("
                       + "; ".join(f"{k}: {fixes[k]}" for k in sorted(s["dropped"])) + ")")
        if s["prompts_truncated_pct"] > 5:
            out.append(f"{where}: {s['prompts_truncated_pct']}% of rows have a truncated prompt (longest "
                       f"{s['longest_prompt']} tokens, budget {s['max_prompt_len']}): raise {raise_keys}")
        if s["responses_truncated_pct"] > 5:
            low, high = s["response_budget_min"], s["response_budget_max"]
            budget = f"{low}" if low == high else f"{low}-{high}"
            max_len_key, prompt_key = length_keys if pair else ("max_len", "max_prompt_len")
            fix = f"raise {max_len_key} or lower {prompt_key}" if pair else f"raise {length_keys}"
            out.append(f"{where}: {s['responses_truncated_pct']}% of rows have a truncated response (longest "
                       f"{s['longest_response']} tokens, budget {budget} tokens = {max_len_key} {s['max_len']} minus "
                       f"the prompt, which keeps up to {s['max_prompt_len']} tokens ({prompt_key})): {fix}")
        if s["unk_pct"] > 1:
            out.append(f"{where}: {s['unk_pct']}% of tokens map to the tokenizer's unknown token {self.unk_token!r}: "
                       "the tokenizer does not cover this data; use the model's own tokenizer or train one on it")
        return out

    def check_batch_size(self, batch_size: int, key: str, what: str = "examples", group: int = 1,
                         group_key: str = "") -> None:
        """A training iterator's batch must not be larger than the split (an epoch would have no step):
        a one-line ValueError naming `key` (e.g. "config.batch_size"), the number of `what` kept and
        the files. `group` rows of the batch come from one example (RL groups, named by `group_key`)."""
        needed = batch_size // group
        if needed <= len(self):
            return
        if self.kind == "text":
            what = f"sequences of {self.max_len} tokens (packed from {self.num_source_rows} rows)"
        elif self.num_source_rows != len(self):
            what = f"{what} kept of {self.num_source_rows} rows"
        asked = f"{key}={batch_size}" + (f" ({needed} x {group_key}={group})" if group > 1 else "")
        raise ValueError(f"{asked} is larger than the {len(self)} {what} in {', '.join(self.paths)}: an epoch "
                         f"would have no step; lower {key} (to at most {len(self) * group}) or add data")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def record(self, i: int) -> dict:
        """The parsed source record of example i (for a packed text split: of source row i)."""
        row = i if self.kind == "text" else int(self.examples[i]["index"])
        return builders.decode_record(self.source[row])

    def length(self, i: int) -> int:
        """Longest sequence of example i (what bucketing sorts by)."""
        e = self.examples[i]
        if self.batch_format == "ranking":
            return max(len(s) for s in e["input_ids"])
        return len(e["prompt_ids"] if self.batch_format == "prompts" else e["input_ids"])

    def full_length(self) -> int:
        return self.max_prompt_len if self.batch_format == "prompts" else self.max_len

    def collate(self, rows: Sequence[int], bucket_boundaries: Sequence[int] | None = None) -> dict:
        """Pads examples `rows` (-1 = a padding row) into a batch; T = max_len (prompts: max_prompt_len)
        or the smallest bucket boundary that fits the batch."""
        examples = [self.examples[int(r)] if r >= 0 else None for r in rows]
        pad_len = self.full_length()
        if bucket_boundaries:
            longest = max([self.length(int(r)) for r in rows if r >= 0] or [1])
            pad_len = batching.bucket_length(longest, bucket_boundaries)
        if self.batch_format == "lm":
            return batching.collate_lm(examples, pad_len, self.pad_id)
        if self.batch_format == "ranking":
            return batching.collate_ranking(examples, pad_len, self.pad_id, self.num_responses)
        return batching.collate_prompts(examples, pad_len, self.pad_id)

    def iterator(self, batch_size: int, seed: int = 0, *, shuffle: bool = True, drop_remainder: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                 bucket_boundaries: Sequence[int] | None = None, bucket_window: int = 16) -> BatchIterator:
        """A BatchIterator over this split (see iterator.py). `batch_size` is GLOBAL; each process gets
        batch_size / process_count rows. With `bucket_boundaries` (e.g. (128, 256, 512)) batches hold
        rows of similar length and are padded to the smallest boundary that fits (max_len is always a
        boundary), so there is one compiled shape per boundary."""
        lengths, boundaries = None, None
        if bucket_boundaries:
            full = self.full_length()
            boundaries = sorted({int(b) for b in bucket_boundaries if b < full} | {full})
            lengths = np.asarray([self.length(i) for i in range(len(self))])
        return BatchIterator(len(self), lambda rows: self.collate(rows, boundaries), batch_size, seed,
                             shuffle=shuffle, drop_remainder=drop_remainder, num_epochs=num_epochs,
                             process_index=process_index, process_count=process_count,
                             lengths=lengths, bucket_window=bucket_window if boundaries else 0)


def token_counts(examples: Sequence[dict], unk_id: int | None) -> tuple[int, int]:
    """(tokens, tokens equal to `unk_id`) over every sequence of `examples`."""
    seqs = [s for e in examples for key in ("input_ids", "prompt_ids") if key in e
            for s in (e[key] if isinstance(e[key], list) else [e[key]])]
    if not seqs:
        return 0, 0
    ids = np.concatenate(seqs)
    return int(ids.size), int(np.sum(ids == unk_id)) if unk_id is not None else 0


def prompt_budget(max_len: int, max_prompt_len: int | None, batch_format: str) -> int:
    """max_prompt_len, defaulted (max_len // 2; prompt batches: max_len) and range-checked."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if max_prompt_len is None:
        return max_len if batch_format == "prompts" else max_len // 2
    upper = max_len if batch_format == "prompts" else max_len - 1  # a response keeps >= 1 token
    if not 1 <= max_prompt_len <= upper:
        raise ValueError(f"max_prompt_len={max_prompt_len} must be in [1, {upper}] for max_len={max_len}")
    return max_prompt_len


def load_split(kind: str, path: str | Sequence[str], tokenizer, *, max_len: int, max_prompt_len: int | None = None,
               batch_format: str | None = None, template: str = "auto", truncate: bool = True,
               data_dir: str | None = None, text_separator: str = "blank_line") -> TokenizedSplit:
    """Builds/reads the TFDS array_record copy of `path` and tokenizes it for `batch_format`.

    kind: formats.KINDS; batch_format: "lm" | "ranking" | "prompts" (default by kind: demonstrations
    and text -> lm, comparisons/rankings/hh -> ranking, prompts -> prompts; any chat kind can give
    "prompts", and "lm" trains on the best response). max_len: sequence length T of lm/ranking
    batches; max_prompt_len: prompt budget (default max_len // 2; for prompt batches it is P,
    default max_len). template: chat.TEMPLATES. data_dir: TFDS cache (default ~/.cache/rlhf_jax/tfds).
    """
    formats.check_kind(kind)
    batch_format = batch_format or DEFAULT_BATCH_FORMAT[kind]
    if batch_format not in BATCH_FORMATS:
        raise ValueError(f"batch_format must be one of {BATCH_FORMATS}, got {batch_format!r}")
    allowed = {"text": ("lm",), "prompts": ("prompts",), "demonstrations": ("lm", "prompts")}.get(kind, BATCH_FORMATS)
    if batch_format not in allowed:
        raise ValueError(f"kind={kind!r} gives batch_format {allowed}, not {batch_format!r}")
    chat.resolve_template(tokenizer, template)
    max_prompt_len = prompt_budget(max_len, max_prompt_len, batch_format)
    paths = [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
    source = builders.prepare_source(kind, paths, data_dir, text_separator)
    records = [builders.decode_record(r) for r in source.__getitems__(list(range(len(source))))]
    drops = tokenization.DataStats()
    args = (records, tokenizer, template)
    try:
        if kind == "text":
            examples = tokenization.packed_text_examples(records, tokenizer, max_len)
        elif batch_format == "lm":
            examples = tokenization.lm_examples(*args, max_len, max_prompt_len, truncate, drops)
        elif batch_format == "ranking":
            examples = tokenization.ranking_examples(*args, max_len, max_prompt_len, truncate, drops)
        else:
            examples = tokenization.prompt_examples(*args, max_prompt_len, truncate, drops)
    except tokenization.RowError as error:  # the file and line of a row the chat template cannot render
        where = paths[0] if len(paths) == 1 else f"one of {', '.join(paths)}"
        raise formats.DataError(where, error.line, "messages", error.problem) from None
    if not examples:
        raise formats.DataError(", ".join(paths), None, None,
                                f"empty split: all {len(records)} rows were dropped {dict(drops.counts)}")
    num_responses = len(examples[0]["input_ids"]) if batch_format == "ranking" else 0
    return TokenizedSplit(kind=kind, batch_format=batch_format, paths=paths, source=source, examples=examples,
                          drops=drops, max_len=max_len, max_prompt_len=max_prompt_len, pad_id=chat.pad_id(tokenizer),
                          num_responses=num_responses, num_source_rows=len(records),
                          template=chat.resolve_template(tokenizer, template) if kind != "text" else "none (text)",
                          unk_token=tokenizer.unk_token, unk_id=tokenizer.unk_token_id)


def hh_ranking_batches(path: str, tokenizer, *, max_len: int, batch_size: int, seed: int = 0,
                       data_dir: str | None = None, template: str = "auto", **iterator_kwargs) -> BatchIterator:
    """Ranking batches (K=2, chosen rank 0) from an Anthropic HH-RLHF JSONL(.gz) file."""
    split = load_split("hh", path, tokenizer, max_len=max_len, data_dir=data_dir, template=template)
    return split.iterator(batch_size, seed, **iterator_kwargs)
