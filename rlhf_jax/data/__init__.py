"""Data: local files -> TFDS array_record -> chat-formatted tokens -> fixed-shape numpy batches.

Entry point for trainers:

    split = load_split(kind, path, tokenizer, max_len=512, data_dir=f"{workdir}/data")
    len(split); split[i]            # tokenized example i (numpy); split.record(i): parsed source row
    split.num_dropped               # rows dropped for length (split.drop_counts per reason); log it
    it = split.iterator(batch_size, seed)    # global batch size; this process's rows only
    batch = next(it)                # numpy dict in the shared batch format
    state = it.get_state()          # dict of ints -> checkpoint; it.set_state(state) resumes

kind (formats.py): "demonstrations" | "comparisons" | "rankings" | "prompts" | "hh" | "text";
batch format (batching.py): "lm" {input_ids, attention_mask, loss_mask} [B,T] right-padded,
"ranking" {input_ids, attention_mask} [P,K,T] + ranks [P,K] (0 = best), "prompts" {prompt_ids,
prompt_mask} [B,P] left-padded + index [B]. `hh_ranking_batches(path, tokenizer, max_len=...,
batch_size=...)` gives RM batches straight from an Anthropic HH-RLHF file.

Pipeline and where each rule lives:
- formats.py: JSONL (.gz) / text parsing, the accepted fields, DataError (file, line, field).
- builders.py: the tfds GeneratorBasedBuilder written as array_record and read with
  `as_data_source` (random access, no TensorFlow), cached by file hash under data_dir.
- chat.py: the tokenizer's chat template or a documented default; loss on assistant turns.
- tokenization.py: left truncation of prompts, right truncation of responses, EOS, drop counting.
- iterator.py: per-epoch shuffling from (seed, epoch), process sharding, drop_remainder,
  bucketing, get_state / set_state.
"""
from rlhf_jax.data.batching import collate_lm, collate_prompts, collate_ranking
from rlhf_jax.data.builders import LocalFiles, LocalFilesConfig, prepare_source
from rlhf_jax.data.chat import TEMPLATES
from rlhf_jax.data.dataset import TokenizedSplit, hh_ranking_batches, load_split
from rlhf_jax.data.formats import KINDS, DataError, read_records
from rlhf_jax.data.iterator import BatchIterator, epoch_plan

__all__ = [
    "BatchIterator", "DataError", "KINDS", "LocalFiles", "LocalFilesConfig", "TEMPLATES", "TokenizedSplit",
    "collate_lm", "collate_prompts", "collate_ranking", "epoch_plan", "hh_ranking_batches", "load_split",
    "prepare_source", "read_records",
]
