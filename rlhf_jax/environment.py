"""What a run ran on: library versions and the machine, recorded in every run's config.json (key
`environment`) and in the pipeline's summary.json, so a number can be traced to its set-up."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers", "tokenizers",
            "tensorflow-datasets", "array-record", "ml-collections", "safetensors", "torch")
"""Distributions whose versions are recorded (the ones not installed are left out)."""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else `platform.processor()`), "" when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict:
    """{"versions": {distribution: version}, "python", "platform", "cpu": model, "cpu_count",
    "backend" (jax platform), "device_kind", "device_count" (global), "process_count"}."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    from rlhf_jax import __version__

    versions["rlhf_jax"] = __version__
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "process_count": jax.process_count()}
