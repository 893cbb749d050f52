"""Export a run (SFT / pretraining / RL policy, or reward model) as a Hugging Face directory.

    python experiments/export_hf.py --workdir runs/sft --out exported/sft
    python experiments/export_hf.py --workdir runs/rm --out exported/rm
    python experiments/export_hf.py --workdir runs/sft_lora --out exported/adapters --adapters  # LoRA: PEFT files

A policy loads with `AutoModelForCausalLM` (+ `generate`, stopping at our EOS through
generation_config.json), a reward model with `AutoModelForSequenceClassification` (the raw score;
ours subtracts config.json's `rlhf_jax_reward_norm` mean and divides by its std). The tokenizer is
written beside the weights. `--out` must be new or empty (or an earlier export of the same run).
See rlhf_jax/export.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags  # noqa: E402

from rlhf_jax import cli, export  # noqa: E402
from rlhf_jax.trainers.setup import one_line_errors  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of any stage (its newest checkpoint is exported).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "New or empty output directory.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory, when the run has none of its own.")
_ADAPTERS = flags.DEFINE_bool("adapters", False, "A LoRA run: write its adapters alone in the PEFT format "
                              "(adapter_config.json + adapter_model.safetensors) instead of the merged model.")
cli.define_traceback_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_script_logging()
    with one_line_errors(ValueError):  # a bad --workdir, --out or --tokenizer: one line naming it
        if _ADAPTERS.value:
            record = export.export_peft(_WORKDIR.value, _OUT.value)
        else:
            record = export.export_hf(_WORKDIR.value, _OUT.value, tokenizer=_TOKENIZER.value)
    if _ADAPTERS.value:
        base = record["base"]
        print(f"Exported the LoRA adapters of {_WORKDIR.value} (step {record['step']}) to {_OUT.value} (PEFT format): "
              f"load them with peft.PeftModel.from_pretrained(<base>, {_OUT.value!r}) on the base this run adapted "
              f"({base['source']} {base['path']}" + (", exported first with this script" if base["source"] ==
                                                      "checkpoint" else "") + ")")
        return
    auto = "AutoModelForCausalLM" if record["kind"] == "policy" else "AutoModelForSequenceClassification"
    print(f"Exported {record['kind'].replace('_', ' ')} {_WORKDIR.value} (step {record['step']}) to {_OUT.value}: "
          f"load it with transformers.{auto}.from_pretrained({_OUT.value!r}) "
          f"(eos_token_id={record['eos_token_id']}, pad_token_id={record['pad_token_id']})")


if __name__ == "__main__":
    app.run(main)
