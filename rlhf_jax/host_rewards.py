"""Reward functions on decoded text, run on the host (RL with verifiable rewards).

A reward function is plain Python in the user's own module:

    def reward(prompts: list[str], responses: list[str], **fields) -> list[float]: ...

`prompts` are the prompt texts (without the chat template), `responses` the decoded responses (up to
the first EOS, `evaluation.decode_responses`), `fields` the extra columns of the prompt file for the
same rows (`rlhf_jax.data.prompt_fields`, e.g. `answer`); a function that does not take `**fields`
gets only the fields it names. A field a function names without a default must be a column of the
prompt file: checked at start-up, before anything is compiled (`check_fields`). It returns one finite
number per response.

The config names them as `config.rewards.functions = "pkg.module:function=weight, ..."` (weight 1
when left out; `path/to/file.py:function` also works). The score of a response is
Σ_i weight_i · f_i (plus the rule rewards and the RM, `algorithms.rollout.score_responses`); each
function's mean is logged as `reward/<function name>`.

Where it runs: the RL iteration is two jitted programs, generation, then (host reward) scoring,
log-probs, advantages and the update (`trainers/host_step.py`, which also says why). With several
processes each process scores its own rows (the prompts it loaded) and the scores are assembled into
one global array like the prompts. Errors name the config key, the function, the prompt index and
the bad value, on one line (`RewardFunctionError`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import numbers
import pathlib
from typing import Callable, Mapping, Sequence

import numpy as np

KEY = "config.rewards.functions"


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, raises, or returns the wrong length / type / a
    non-finite value. The message starts with the config key (the scripts print it on one line)."""


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """One configured function: `name` (metric `reward/<name>`), `spec` as written, `weight`, `fn`."""

    name: str
    spec: str
    weight: float
    fn: Callable


# ----------------------------------------------------------------------------------------------
# Configuration: "module:function=weight, ..."
# ----------------------------------------------------------------------------------------------
def parse_specs(text: str, key: str = KEY) -> list[tuple[str, float]]:
    """[(spec, weight)] from "a.b:f=0.5, c:g" (weight 1.0 when left out); ValueError naming `key`."""
    out = []
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        spec, _, weight = entry.partition("=")
        spec = spec.strip()
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise RewardFunctionError(f"{key}: {entry!r} is not 'module.path:function[=weight]'")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise RewardFunctionError(f"{key}: {entry!r}: weight {weight.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise RewardFunctionError(f"{key}: {entry!r}: weight must be finite")
        out.append((spec, value))
    return out


def _module(target: str, spec: str, key: str):
    try:
        if target.endswith(".py"):
            path = pathlib.Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except Exception as error:  # noqa: BLE001 — any import failure of user code becomes one line
        raise RewardFunctionError(f"{key}: {spec!r}: cannot import {target!r} ({type(error).__name__}: "
                                  f"{error})") from error


def load_functions(text: str, key: str = KEY) -> list[RewardFunction]:
    """Import the configured functions (errors name `key`, the entry and what is wrong)."""
    functions: list[RewardFunction] = []
    for spec, weight in parse_specs(text, key):
        target, name = spec.split(":")
        fn = getattr(_module(target, spec, key), name, None)
        if not callable(fn):
            raise RewardFunctionError(f"{key}: {spec!r}: {target!r} has no function {name!r}")
        if name in {f.name for f in functions}:
            raise RewardFunctionError(f"{key}: two functions named {name!r} (metric reward/{name} would be ambiguous)")
        functions.append(RewardFunction(name=name, spec=spec, weight=weight, fn=fn))
    return functions


# ----------------------------------------------------------------------------------------------
# Calling one function, with checks
# ----------------------------------------------------------------------------------------------
def _accepted(fn: Callable, fields: Mapping[str, list]) -> dict[str, list]:
    """The fields `fn` takes: all with **kwargs, else those it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(fields)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(fields)
    names = {p.name for p in params}
    return {k: v for k, v in fields.items() if k in names}


def required_fields(fn: Callable) -> list[str]:
    """The prompt-file fields `fn` cannot run without: its parameters after `prompts` and `responses`
    that are passed by name and have no default. What a function reads from `**fields` is not
    declared: a missing one is named when the function raises KeyError on it (`call_function`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    return [p.name for p in params if p not in positional and p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def describe_columns(columns: Sequence[str], source: str) -> str:
    """"config.data.prompts='f.jsonl' has the columns ['a', 'b']" (the fields the functions can get)."""
    have = f"the columns {sorted(columns)}" if columns else "no columns"
    return f"config.data.prompts={source!r} has {have} besides the prompt"


def check_fields(functions: Sequence[RewardFunction], columns: Sequence[str], source: str, key: str = KEY) -> None:
    """Before anything runs: every field a function names (`required_fields`) is a column of the prompt
    file(s) `source`; else a one-line error naming the function, the field and the columns there are."""
    for function in functions:
        missing = [name for name in required_fields(function.fn) if name not in columns]
        if missing:
            raise RewardFunctionError(f"{key}: reward function {function.spec} needs the prompt-file field "
                                      f"{missing[0]!r}, but {describe_columns(columns, source)}; add the column "
                                      "to the file or give the parameter a default")


def _first_failing_row(function: RewardFunction, prompts, responses, fields) -> int | None:
    for row in range(len(responses)):
        try:
            function.fn(prompts[row:row + 1], responses[row:row + 1], **{k: v[row:row + 1] for k, v in fields.items()})
        except Exception:  # noqa: BLE001
            return row
    return None


def call_function(function: RewardFunction, prompts: Sequence[str], responses: Sequence[str],
                  fields: Mapping[str, list], index: Sequence[int], key: str = KEY, source: str = "") -> np.ndarray:
    """`function` on one batch -> float64 `[B]`. `index [B]` are the rows' prompt indices (for errors);
    `fields` every column of the prompt file(s) `source` for those rows.

    Raises `RewardFunctionError` naming the function, the prompt index and the value when it raises
    (the first row that raises alone is named; a KeyError, in a function given every column, on a name
    that is not one also lists the file's columns), returns something that is not a sequence of B real
    numbers, or returns a non-finite number."""
    columns = sorted(fields)
    fields = _accepted(function.fn, fields)
    where = f"{key}: reward function {function.spec}"
    try:
        values = function.fn(list(prompts), list(responses), **fields)
    except Exception as error:  # noqa: BLE001 — user code: name it, the row and the error
        row = _first_failing_row(function, list(prompts), list(responses), fields)
        at = "" if row is None else f" on prompt index {int(index[row])} (response {responses[row][:80]!r})"
        missing = error.args[0] if isinstance(error, KeyError) and error.args else None
        if isinstance(missing, str) and missing not in columns and sorted(fields) == columns:  # it gets **fields
            at += f": {missing!r} is not a column of the prompt file ({describe_columns(columns, source)})"
        raise RewardFunctionError(f"{where} raised {type(error).__name__}: {error}{at}") from error
    if isinstance(values, np.ndarray):
        values = values.tolist() if values.ndim == 1 else values
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"{where} returned {type(values).__name__}, expected a list of {len(responses)} "
                                  "floats")
    if len(values) != len(responses):
        raise RewardFunctionError(f"{where} returned {len(values)} values for {len(responses)} responses "
                                  f"(prompt indices {int(index[0])}..{int(index[-1])})")
    for row, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"{where} returned {value!r} ({type(value).__name__}) for prompt index "
                                      f"{int(index[row])}, expected a float")
        if not math.isfinite(float(value)):
            raise RewardFunctionError(f"{where} returned {value!r} for prompt index {int(index[row])}: rewards must "
                                      "be finite")
    return np.asarray(values, np.float64)


# ----------------------------------------------------------------------------------------------
# Scoring a batch of sampled responses
# ----------------------------------------------------------------------------------------------
class HostReward:
    """Weighted sum of reward functions over a batch of sampled token rows.

    `rows`: the prompt files' `PromptRows`; `decode(tokens [B, N], mask [B, N]) -> list[str]` turns
    responses into text (the evaluation's `decode_responses`). `__call__(index [B], tokens, mask)`
    returns {"score": float32 [B] = Σ weight · value, <name>: float32 [B] per function}; padding
    rows (index < 0) score 0 and are not shown to the functions. Construction checks that the rows
    have every field the functions name (`check_fields`)."""

    def __init__(self, functions: Sequence[RewardFunction], rows, decode: Callable[[np.ndarray, np.ndarray], list]):
        if not functions:
            raise RewardFunctionError(f"{KEY}: no reward functions configured")
        check_fields(functions, sorted(rows.fields), rows.source)  # at start-up, not after the first rollout
        self.functions, self.rows, self.decode = list(functions), rows, decode

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions)

    def __call__(self, index: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        index = np.asarray(index)
        real = np.flatnonzero(index >= 0)
        if len(real) and index[real].max() >= len(self.rows):
            raise RewardFunctionError(f"{KEY}: prompt index {int(index[real].max())} is beyond the {len(self.rows)} "
                                      "rows of config.data.prompts")
        out = {name: np.zeros(len(index), np.float32) for name in ("score",) + self.names}
        if not len(real):
            return out
        prompts, fields = self.rows.take(index[real])
        responses = self.decode(np.asarray(tokens)[real], np.asarray(mask)[real])
        total = np.zeros(len(real), np.float64)
        for function in self.functions:
            values = call_function(function, prompts, responses, fields, index[real], source=self.rows.source)
            out[function.name][real] = values
            total += function.weight * values
        out["score"][real] = total
        return out
