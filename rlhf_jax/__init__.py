"""rlhf_jax: pretrain -> SFT -> reward model -> RL, in JAX/Flax.

    import rlhf_jax
    model, params, tokenizer = rlhf_jax.load_run("runs/sft")    # any stage's run, with its tokenizer
    model, params = rlhf_jax.load("runs/sft")                   # any stage's newest checkpoint
    model, params, norm = rlhf_jax.load_reward_model("runs/rm")
    tokenizer = rlhf_jax.load_tokenizer("runs/sft/tokenizer")

(`rlhf_jax.loading`; imported on first use so `import rlhf_jax` stays light.)
"""

__version__ = "0.1.0"

_LOADERS = {"load": "load_model", "load_run": "load_run", "load_reward_model": "load_reward_model",
            "load_tokenizer": "load_tokenizer"}


def __getattr__(name):
    if name in _LOADERS:
        from rlhf_jax import loading

        return getattr(loading, _LOADERS[name])
    raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")
