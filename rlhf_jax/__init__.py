"""rlhf_jax: pretrain -> SFT -> reward model -> PPO, in JAX/Flax."""

__version__ = "0.1.0"
