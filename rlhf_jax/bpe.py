"""A byte-level BPE tokenizer trained on the user's own data (`tokenizers`), saved in the Hugging
Face format for every stage (`--config.data.tokenizer=DIR`).

    python experiments/train_tokenizer.py --files data/hh.jsonl.gz --kind hh --out runs/tokenizer

Byte-level (GPT-2 style): every string encodes, nothing maps to an unknown token, and decode
inverts encode. The special tokens are the ones our chat templates and padding need
(rlhf_jax.data.chat): EOS `<|endoftext|>` (ends every response), a pad token `<|pad|>` distinct
from EOS (so an exported reward model scores right-padded batches in transformers as we do), and the
"default" template's role headers `<|system|>`, `<|user|>`, `<|assistant|>` as single tokens. No
BOS (the templates add one only when a tokenizer has one) and no chat_template, so
`template="auto"` uses our "default" template; use `template="hh"` for HH-RLHF data.
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Iterator

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS) + ROLE_TOKENS
"""Ids 0..4 in this order: pad 0 and EOS 1, the ids the RL configs assume (rollout.pad_id, rollout.eos_id)."""


def record_texts(records: Iterable[dict]) -> Iterator[str]:
    """Every text of parsed records (rlhf_jax.data.read_records): message contents and responses,
    or a corpus document's text."""
    for record in records:
        if "text" in record:
            yield record["text"]
            continue
        for message in record["messages"]:
            yield message["content"]
        yield from record["responses"]


def file_texts(paths: list[str], kind: str, text_separator: str = "blank_line") -> Iterator[str]:
    """Texts of `paths` read as `kind` (rlhf_jax.data.KINDS); files ending in .txt are read as "text"
    whatever `kind` is. Raises rlhf_jax.data.DataError naming the file, line and field of a bad row."""
    from rlhf_jax.data import read_records

    for path in paths:
        this_kind = "text" if path.endswith((".txt", ".txt.gz")) else kind
        yield from record_texts(read_records(this_kind, [path], text_separator))


def train_bpe(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2):
    """A `PreTrainedTokenizerFast`: byte-level BPE with at most `vocab_size` tokens (special tokens
    and the 256 byte symbols included), merges seen at least `min_frequency` times."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(SPECIAL_TOKENS) + 256} special and byte tokens")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS),
                                   clean_up_tokenization_spaces=False, padding_side="right")


def train_tokenizer_files(paths: list[str], out: str | pathlib.Path, *, kind: str = "demonstrations",
                          vocab_size: int = 8000, min_frequency: int = 2, text_separator: str = "blank_line"):
    """Train on `paths` and `save_pretrained` into `out` (new or empty: rlhf_jax.export.ExportError
    otherwise, nothing written). Returns the tokenizer."""
    from rlhf_jax.export import check_out_dir

    check_out_dir(out)
    missing = [p for p in paths if not pathlib.Path(p).is_file()]
    if not paths or missing:
        raise ValueError(f"--files: {', '.join(missing) or 'no files given'}: no such file")
    tokenizer = train_bpe(file_texts(paths, kind, text_separator), vocab_size, min_frequency)
    tokenizer.save_pretrained(str(out))
    return tokenizer
