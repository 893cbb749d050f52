"""TFDS builder that turns local files into array_record datasets, read back without TensorFlow.

`LocalFiles` is a `tfds.core.GeneratorBasedBuilder`; its `LocalFilesConfig` carries the data kind,
the source paths and the parse options. `prepare_source(...)` builds it with
`file_format="array_record"` (`download_and_prepare` writes through the array_record writer, no
TensorFlow, and no Beam) and returns `builder.as_data_source()["train"]`, an
`ArrayRecordDataSource` with `len()` and random access (`source[i]` -> dict of numpy/bytes).
Checked with tensorflow-datasets 4.9.10 and tensorflow not installed.

The config name holds a SHA-256 of the kind, the options and the bytes of every source file, so
editing a file rebuilds, and an unchanged file is read from the cache under `data_dir`.
tfds writes into a temporary folder and renames it when done; on several hosts sharing one
data_dir, let process 0 build first (or give each host its own data_dir).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from etils import epath

from rlhf_jax.data import formats

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "tfds")


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
    """Which files to read and how: kind (formats.KINDS), paths, text_separator."""

    kind: str = "prompts"
    paths: tuple[str, ...] = ()
    text_separator: str = "blank_line"


def _chat_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "index": np.int64,
        "line": np.int64,
        "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
        "responses": tfds.features.Sequence(tfds.features.Text()),
        "ranks": tfds.features.Sequence(np.int32),
    })


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"index": np.int64, "line": np.int64, "text": tfds.features.Text()})


class LocalFiles(tfds.core.GeneratorBasedBuilder):
    """Parsed, validated local JSONL / text files as one "train" split (file order kept)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives code_path from the package via importlib_resources, which etils only has when
    # its epath extra is installed; this file's own path is what that lookup would return.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Demonstrations, comparisons, rankings, prompts, HH-RLHF, text."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = _text_features() if self.builder_config.kind == "text" else _chat_features()
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        count = 0
        for count, record in enumerate(formats.read_records(cfg.kind, list(cfg.paths), cfg.text_separator), 1):
            yield record["index"], record
        if count == 0:  # tfds would only say "No examples were yielded"
            raise formats.DataError(", ".join(cfg.paths), None, None, "empty split: no examples in the file")


def config_for(kind: str, paths: list[str], text_separator: str = "blank_line") -> LocalFilesConfig:
    """A config named <kind>-<first file stem>-<hash of kind, options and file bytes>."""
    formats.check_kind(kind)
    paths = [os.path.abspath(p) for p in paths]
    digest = hashlib.sha256(json.dumps([kind, text_separator, LocalFiles.VERSION.__str__()]).encode())
    for path in paths:
        if not os.path.isfile(path):
            raise formats.DataError(path, None, None, "file not found")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(paths[0]).split(".")[0].lower()).strip("_") or "data"
    return LocalFilesConfig(name=f"{kind}-{stem}-{digest.hexdigest()[:16]}", kind=kind, paths=tuple(paths),
                            text_separator=text_separator, description=f"{kind} from {', '.join(paths)}")


def prepare_source(kind: str, paths: str | list[str], data_dir: str | None = None,
                   text_separator: str = "blank_line"):
    """Builds (once) and opens the array_record dataset of `paths`; bad or empty input raises DataError.

    With several JAX processes every process must call it (same arguments, same order): process 0
    builds first and the others wait for it (a barrier), then open the cache when `data_dir` is shared
    or build their own copy when it is not; without the barrier two processes on one file system
    race to rename the same TFDS build directory (FileExistsError)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no data files given")
    config = config_for(kind, [str(p) for p in paths], text_separator)

    def prepared() -> LocalFiles:
        with quiet_tfds():
            builder = LocalFiles(config=config, data_dir=data_dir or DEFAULT_DATA_DIR, file_format="array_record")
            builder.download_and_prepare()
        return builder

    if jax.process_count() == 1:
        return prepared().as_data_source()["train"]
    builder, error = None, None
    if jax.process_index() == 0:
        try:
            builder = prepared()
        except Exception as e:  # raised after the barrier, so the other processes do not wait forever
            error = e  # (they meet the same bad input themselves)
    multihost_utils.sync_global_devices(f"rlhf_jax data cache {config.name}")
    if error is not None:
        raise error
    return (builder or prepared()).as_data_source()["train"]


class _DropCustomConfigWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


@contextlib.contextmanager
def quiet_tfds():
    """Builds without TFDS's banners, progress bars and per-build "Using custom data configuration"
    warning (every LocalFiles config is a custom one): the trainers print their own progress, and
    bad input raises DataError rather than being reported there. TFDS progress bars are re-enabled
    (its default) afterwards."""
    absl_logger = logging.getLogger("absl")
    drop = _DropCustomConfigWarning()
    absl_logger.addFilter(drop)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(True)
        absl_logger.removeFilter(drop)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode_record(raw: dict) -> dict:
    """An array_record example back to the normalized record of formats.py (bytes -> str)."""
    record = {"index": int(raw["index"]), "line": int(raw["line"])}
    if "text" in raw:
        record["text"] = _text(raw["text"])
        return record
    record["messages"] = [{"role": _text(r), "content": _text(c)}
                          for r, c in zip(raw["messages"]["role"], raw["messages"]["content"])]
    record["responses"] = [_text(r) for r in raw["responses"]]
    record["ranks"] = [int(r) for r in raw["ranks"]]
    return record
