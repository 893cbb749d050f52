"""Train a byte-level BPE tokenizer on your own JSONL / text files (Hugging Face format).

    python experiments/train_tokenizer.py --files experiments/data/hh-rlhf/harmless-base-test.jsonl.gz \
        --kind hh --out runs/hh_tokenizer --vocab_size 4000

Then give it to every stage with --config.data.tokenizer=runs/hh_tokenizer. Files ending in .txt
are read as a plain-text corpus; the others as --kind (the field rules of every kind:
rlhf_jax/data/formats.py). Special tokens: rlhf_jax/bpe.py. --out must be new or empty.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

from rlhf_jax import bpe, cli  # noqa: E402
from rlhf_jax.data import KINDS  # noqa: E402
from rlhf_jax.trainers.setup import one_line_errors  # noqa: E402

_FILES = flags.DEFINE_list("files", None, "JSONL (.gz) or .txt files, comma-separated.", required=True)
_KIND = flags.DEFINE_enum("kind", "demonstrations", KINDS, "Format of the JSONL files.")
_OUT = flags.DEFINE_string("out", None, "New or empty directory for the tokenizer files.", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, special and byte tokens included.")
_MIN_FREQ = flags.DEFINE_integer("min_frequency", 2, "Fewest occurrences of a pair for a merge.")
_SEPARATOR = flags.DEFINE_enum("text_separator", "blank_line", ["blank_line", "line"],
                               "Documents of .txt files: separated by blank lines, or one per line.")
cli.define_traceback_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    with one_line_errors(ValueError):  # bad files, rows, --out or --vocab_size: one line naming it
        tokenizer = bpe.train_tokenizer_files(_FILES.value, _OUT.value, kind=_KIND.value, vocab_size=_VOCAB.value,
                                              min_frequency=_MIN_FREQ.value, text_separator=_SEPARATOR.value)
    print(f"Tokenizer with {len(tokenizer)} tokens (eos {tokenizer.eos_token!r} = {tokenizer.eos_token_id}, "
          f"pad {tokenizer.pad_token!r} = {tokenizer.pad_token_id}) saved to {_OUT.value}; use it with "
          f"--config.data.tokenizer={_OUT.value}")


if __name__ == "__main__":
    app.run(main)
