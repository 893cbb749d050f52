"""SFT (InstructGPT stage 1) and pretraining configs: `get_config("tiny" | "tiny_pretrain" | "gpt2" | "qwen2")`.

    python experiments/train_sft.py --config configs/sft.py:tiny --workdir /tmp/sft --config.seed 1

- tiny          : CPU, well under a second per step. With no data configured it exports the built-in
                  instruction task (rlhf_jax.tasks) into WORKDIR/task and trains a fresh 2-layer model
                  on its demonstrations (loss on response tokens only).
- tiny_pretrain : the same model pretrained on the task's text corpus (loss on every token).
- gpt2          : GPT-2 124M from a local Hugging Face directory (--config.init.path); accelerators.
- qwen2         : Qwen2-0.5B from a local HF directory (RoPE, RMSNorm, SwiGLU, GQA, qkv bias), FSDP.
"""
from __future__ import annotations

import ml_collections

from configs import common

PRESETS = ("tiny", "tiny_pretrain", "gpt2", "qwen2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"configs/sft.py: unknown preset {preset!r} (allowed: {', '.join(map(repr, PRESETS))})")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset built this config (informational)
    common.add_run_fields(c, num_steps=60, log_every=10, eval_every=30, save_every=30)
    c.batch_size = 16  # sequences per optimizer update, global over all devices
    c.grad_accum = 1  # microbatches per update (in-step scan); batch_size / grad_accum per microbatch

    # ---- model and where it starts ----------------------------------------------------------------
    c.model = common.model_config()  # architecture for init.source="scratch"; dtype/remat/dropout always
    c.init = common.init_config("scratch")  # scratch | checkpoint (e.g. a pretraining run) | hf
    c.lora = common.lora_config()  # rank > 0: train adapters only on the frozen init (checkpoint | hf)

    # ---- data ------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict(dict(
        kind="demonstrations",  # rlhf_jax.data kind: "demonstrations" (loss on responses), "text"
        #                         (pretraining: loss on all tokens), "comparisons"/"rankings"/"hh" (best response)
        train="",  # training file(s), comma-separated; "" = the built-in task exported to WORKDIR/task
        eval="",  # held-out file of the same kind; "" = built-in task's held-out split (or no eval loss)
        tokenizer="",  # local HF tokenizer dir; "" = built-in task's / init.path's (hf) / the checkpoint's
        template="auto",  # chat template (rlhf_jax.data.TEMPLATES)
        max_len=64,  # sequence length T (prompt + response, right-padded)
        max_prompt_len=0,  # prompt budget (left-truncated); 0 = max_len // 2
        text_separator="blank_line",  # kind="text": documents are separated by "blank_line"s or one per "line"
        cache_dir="",  # TFDS array_record cache; "" = WORKDIR/data
    ))

    # ---- evaluation ------------------------------------------------------------------------------
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=16,  # eval sequences per batch (global)
        num_batches=4,  # eval batches per evaluation; 0 = the whole eval file
        num_samples=4,  # prompts of the eval file sampled and logged to WORKDIR/samples.jsonl; 0 = off
        max_new_tokens=16,  # sample length
        temperature=0.0,  # 0 = greedy
    ))

    # ---- optimisation ----------------------------------------------------------------------------
    c.optim = common.optim_config(learning_rate=3e-3, warmup_steps=5)

    if preset == "tiny_pretrain":
        c.data.update(kind="text", text_separator="line")  # the built-in corpus has one document per line
        c.num_steps = 100
    elif preset == "gpt2":
        c.init = common.init_config("hf", "")  # give --config.init.path=/path/to/gpt2 (HF directory)
        c.model.update(family="gpt2", dtype="bfloat16")
        c.data.update(kind="demonstrations", train="", max_len=1024, max_prompt_len=512)
        c.batch_size, c.grad_accum = 64, 2
        c.optim.update(learning_rate=1e-5, warmup_steps=100, weight_decay=0.0)
        c.num_steps, c.log_every, c.eval_every = 2000, 20, 200
        c.checkpoint.save_every = 500
        c.eval.update(batch_size=64, num_batches=8, max_new_tokens=128)
    elif preset == "qwen2":
        c.init = common.init_config("hf", "")  # give --config.init.path=/path/to/Qwen2-0.5B (HF directory)
        c.model.update(dtype="bfloat16", remat=True)
        c.data.update(kind="demonstrations", train="", max_len=2048, max_prompt_len=1024)
        c.batch_size, c.grad_accum = 64, 4
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.optim.update(learning_rate=1e-5, warmup_steps=100, weight_decay=0.0)
        c.num_steps, c.log_every, c.eval_every = 2000, 20, 200
        c.checkpoint.save_every = 500
        c.eval.update(batch_size=64, num_batches=8, max_new_tokens=256)
    return c
