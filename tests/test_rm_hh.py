"""The real Anthropic HH-RLHF format flows through the real RM pipeline (issue 5).

Reads experiments/data/hh-rlhf/harmless-base-test.jsonl.gz (the 2,312-pair harmless-base test split,
vendored with its MIT licence) with a tiny byte-level BPE trained on a slice of it (conftest's `hh_tokenizer`).
"""
from __future__ import annotations

import math

from configs import rm as rm_configs
from rlhf_jax import metrics
from rlhf_jax.trainers import rm

NUM_STEPS = 4


def test_rm_trains_on_the_hh_rlhf_sample(sample_data_dir, hh_tokenizer, tmp_path):
    hh_file = sample_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"

    config = rm_configs.get_config("tiny")
    config.model.update(d_model=32, d_ff=64, n_heads=2, vocab_size=512)
    config.data.update(kind="hh", train=str(hh_file), eval="", tokenizer=str(hh_tokenizer),
                       template="hh", max_len=64, max_prompt_len=48, cache_dir=str(tmp_path / "tfds"))
    config.update(num_steps=NUM_STEPS, batch_size=8, log_every=1, fast_compile=True)
    config.normalize.num_batches = 2
    config.checkpoint.save_every = NUM_STEPS

    result = rm.train(config, str(tmp_path / "run"))

    rows = [row for row in metrics.read_metrics(tmp_path / "run") if "loss" in row]
    assert result.step == NUM_STEPS and [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
    # -log sigmoid(r_w - r_l) is positive for any finite scores; the normalisation offset is finite.
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    assert math.isfinite(result.last_row["reward_norm/mean"])
    assert (tmp_path / "run" / "checkpoints" / str(NUM_STEPS)).is_dir()
