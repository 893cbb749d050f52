"""rlhf_jax: the InstructGPT recipe (pretrain -> SFT -> RM -> PPO) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="SFT, reward modelling and PPO for language models in JAX/Flax, sharded over device meshes.",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "jinja2>=3.1",  # chat templates (apply_chat_template)
        "safetensors>=0.4",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.60",
        "qwix>=0.1.8,<0.2",  # LoRA / QLoRA adapters (rlhf_jax.lora)
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
    ],
    extras_require={
        # torch is only a reference for parity tests and benchmarks, never needed to train.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "peft>=0.21,<0.22"],  # peft: LoRA export test
        "bench": ["torch==2.13.0", "trl==0.29.1"],
    },
)
