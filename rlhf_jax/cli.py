"""What the experiments/*.py scripts share: the locked `--config` flag, `--config_help` (every
config field with its value and comment), `--traceback`, and quiet logging.

Scripts import this module (and the one trainer they run), never the trainers package just to
parse flags. The flags defined here count as the calling script's own, so its `--help` lists them.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import sys
import tokenize

from absl import flags

# transformers' advisory notes (e.g. "PyTorch was not found": torch is only needed to load exports in
# transformers) would open every script's output; set before any module imports transformers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

flags.disclaim_key_flags()  # flags defined below belong to the script that asks for them (its --help shows them)

# Config keys that moved when every model role got its own section (actor, reference, critic,
# reward: each with an `init` like SFT/RM's). An old command line stops with one line naming the
# new key instead of a generic "unknown key".
RENAMED_KEYS = {
    "actor_checkpoint": "actor.init.path (with --config.actor.init.source=checkpoint or hf)",
    "reward_checkpoint": "reward.init.path (with --config.reward.init.source=checkpoint or hf)",
    "critic_init": "critic.init.source ('actor' or 'reward')",
    "critic": "critic.type ('token', 'shared' or 'sequence')",
    "actor_optim": "actor.optim",
    "critic_optim": "critic.optim",
}


def renamed_key_error(argv: list[str]) -> str | None:
    """The one-line message for the first `--config.<old key>` in `argv`, or None."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=")[0]
        section = "ppo." if key.startswith("ppo.") else ""  # the pipeline config's PPO section
        head, _, rest = key[len(section):].partition(".")
        if head in RENAMED_KEYS and (not rest or head.endswith("_optim")):  # config.critic.type is new
            new = RENAMED_KEYS[head].replace("--config.", f"--config.{section}")
            return (f"FATAL Flags parsing error: --config.{key} was renamed: use "
                    f"--config.{section}{new}{'.' + rest if rest else ''}")
    return None


def config_file_arg(argv: list[str], default: str) -> str:
    """The `--config` value on the command line (`--config=F`, `--config F`), else `default`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def load_config_file(spec: str):
    """get_config(arg) of a config file given as `path[:arg]` (what DEFINE_config_file loads)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_rlhf_jax_config", path)
    if module_spec is None or not pathlib.Path(path).is_file():
        raise ValueError(f"--config={spec}: no such config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def unknown_key_error(config, argv: list[str]) -> str | None:
    """One line for the first `--config.<key>` that `config` does not have, with the closest names."""
    import difflib

    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=")[0]
        section, walked = config, []
        for part in key.split("."):
            if not hasattr(section, "keys") or part not in section:
                choices = sorted(section.keys()) if hasattr(section, "keys") else []
                close = difflib.get_close_matches(part, choices, n=3)
                where = f"config.{'.'.join(walked)}" if walked else "config"
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                return (f"FATAL Flags parsing error: unknown config key {part!r} in --config.{key} ({where} has no "
                        f"field {part!r}{hint})")
            section, walked = section[part], walked + [part]
    return None


# ----------------------------------------------------------------------------------------------
# --config_help: every field of a config file with its value and the comment beside it
# ----------------------------------------------------------------------------------------------
_ASSIGN = re.compile(r"^\s*(?:c\.)?((?:\w+\.)*)(\w+)\s*=(?!=)")
_SECTION = re.compile(r"^\s*(?:c\.)?(\w+)\s*=\s*ml_collections\.ConfigDict\(|^def (\w+)_config\(")
_IMPORTS = re.compile(r"^from configs import (\w+)", re.M)


def _comments_of_file(path: pathlib.Path, out: dict) -> None:
    """Add {(section, field): comment} of one config module to `out` (the first definition wins).

    A field is `name=value,  # comment` inside a `ConfigDict(dict(...))` / `*_config()` helper (its
    section is that dict's name) or `c.a.name = value  # comment` (section `a`; "" for `c.name`);
    comment-only lines right below, indented after the `#`, continue the comment."""
    source = path.read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    section, last = "", None
    for number, line in enumerate(source.splitlines(), start=1):
        opener = _SECTION.match(line)
        if opener:
            section = opener.group(1) or opener.group(2)
        match = _ASSIGN.match(line)
        if match and number in comments and not line.lstrip().startswith("#"):
            prefix, name = match.groups()
            owner = prefix.rstrip(".").split(".")[-1] if prefix else ("" if line.lstrip().startswith("c.") else section)
            last = (owner, name) if (owner, name) not in out else None
            if last is not None:
                out[last] = comments[number]
            code = line[match.end():].split("#")[0]
            for member in re.findall(r"(\w+)=(?!=)", code):  # a one-line section: name=dict(a=1, b=2),  # comment
                out.setdefault((name, member), comments[number])
        elif last is not None and re.match(r"\s*#\s{2,}\S", line):  # an indented continuation line
            out[last] = f"{out[last]} {comments[number]}"
        else:
            last = None


def field_comments(config_file: str | pathlib.Path) -> dict:
    """{module: {(section, field): comment}} of a config file and the `configs` modules it imports
    (`module` is the file's stem; top-level fields have section "")."""
    found, queue = {}, [pathlib.Path(config_file)]
    while queue:
        path = queue.pop(0)
        if path.stem in found or not path.is_file():
            continue
        found[path.stem] = {}
        _comments_of_file(path, found[path.stem])
        queue += [path.parent / f"{name}.py" for name in _IMPORTS.findall(path.read_text())]
    return found


def _stage_sections(config_file: str | pathlib.Path) -> dict:
    """{section: module} for a config that nests other stages' configs, e.g. configs/pipeline.py's
    `c.pretrain = sft_configs.get_config(...)` -> {"pretrain": "sft"}."""
    source = pathlib.Path(config_file).read_text()
    aliases = dict((alias, module) for module, alias in re.findall(r"^from configs import (\w+) as (\w+)", source, re.M))
    return {section: aliases[alias] for section, alias in re.findall(r"^\s*c\.(\w+) = (\w+)\.get_config\(", source, re.M)
            if alias in aliases}


def describe_config(config, config_file: str | pathlib.Path) -> str:
    """Every leaf of `config` as `key = value  # comment`, one per line. A field's comment is looked
    up in the module that defines its section (a nested stage's own file for the pipeline's
    `sft.*`), then in helper modules (configs/common.py), then by a name that has one comment."""
    comments, root = field_comments(config_file), pathlib.Path(config_file).stem
    nested = _stage_sections(config_file)
    by_name: dict = {}  # field name -> its comment, where every definition agrees
    for module in comments.values():
        for (_, name), text in module.items():
            by_name.setdefault(name, set()).add(text)
    by_name = {name: texts.pop() for name, texts in by_name.items() if len(texts) == 1}
    helpers = [m for m in comments if m != root and m not in nested.values()]
    # sections built by a helper under another name, e.g. `c.data = common.ranking_data_config()`
    built_by = dict(re.findall(r"^\s*c\.(\w+) = \w+\.(\w+)_config\(", "\n".join(
        (pathlib.Path(config_file).parent / f"{m}.py").read_text() for m in comments
        if (pathlib.Path(config_file).parent / f"{m}.py").is_file()), re.M))
    lines = []

    def lookup(key: list[str]) -> str:
        module, inner = (nested[key[0]], key[1:]) if key[0] in nested and len(key) > 1 else (root, key)
        section, name = (inner[-2] if len(inner) > 1 else ""), inner[-1]
        for candidate in [module] + helpers:
            for where in (section, built_by.get(section)):
                if (where, name) in comments.get(candidate, {}):
                    return comments[candidate][(where, name)]
        return by_name.get(name, "")

    def walk(node, path):
        for name in node.keys():
            value, key = node[name], path + [name]
            if hasattr(value, "keys") and len(value.keys()):
                walk(value, key)
                continue
            text = lookup(key)
            lines.append(f"{'.'.join(key)} = {value!r}" + (f"  # {text}" if text else ""))

    walk(config, [])
    return "\n".join(lines)


def define_traceback_flag():
    """`--traceback`: show the traceback of an expected error (config, data, paths) instead of one line."""
    if "traceback" not in flags.FLAGS:
        flags.DEFINE_boolean("traceback", False, "On an expected error (config, data, paths, workdir), show "
                             "the Python traceback instead of the one FATAL line.")
    else:
        flags.declare_key_flag("traceback")


def define_config_flag(default: str, help_text: str):
    """`--config` flag of the experiments/*.py scripts: a locked ml_collections config file
    (`config_flags.DEFINE_config_file`), so `--config.<key>=value` may only set existing keys to
    values of their type. A wrong type is absl's one-line `FATAL Flags parsing error`; an unknown
    or renamed key is caught before absl parses the flags (ml_collections would report it as a long
    AttributeError traceback) and becomes the same kind of one-line error naming the key and the
    closest existing ones, exit code 1."""
    from ml_collections import config_flags

    if "--config_help" in sys.argv[1:]:
        spec = config_file_arg(sys.argv[1:], default)
        try:
            text = describe_config(load_config_file(spec), spec.partition(":")[0])
        except ValueError as error:
            sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
            sys.exit(1)
        print(f"Fields of --config={spec} (set any with --config.<key>=<value>):\n{text}")
        sys.exit(0)
    renamed = renamed_key_error(sys.argv[1:])
    if renamed is None:
        try:
            renamed = unknown_key_error(load_config_file(config_file_arg(sys.argv[1:], default)), sys.argv[1:])
        except ValueError as error:
            renamed = f"FATAL Flags parsing error: {error}"
    if renamed:
        sys.stderr.write(renamed + "\n")
        sys.exit(1)
    flags.DEFINE_boolean("config_help", False, "Print every field of the --config file (with the preset given, "
                         "e.g. --config configs/sft.py:tiny --config_help) with its value and comment, then exit.")
    define_traceback_flag()
    try:
        return config_flags.DEFINE_config_file(
            "config", default, help_text + " Override any field with --config.<key>=<value>; list them all with "
            "--config_help.", lock_config=True)
    except (AttributeError, KeyError) as error:
        cause = error.args[0] if error.args else error
        text = cause.args[0] if isinstance(cause, BaseException) and cause.args else cause
        overrides = [arg.split("=")[0] for arg in sys.argv[1:] if arg.startswith("--config.")]
        sys.stderr.write(f"FATAL Flags parsing error: unknown config key {' '.join(str(text).split())} "
                         f"(in {', '.join(overrides)})\n")
        sys.exit(1)


def quiet_script_logging() -> None:
    """absl logging of the experiments/*.py scripts: WARNING unless --verbosity is given (Orbax logs
    every save at INFO, which buries the progress bars)."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_trainer(argv: list[str], train, config, workdir: str, name: str, keys: tuple[str, ...]) -> None:
    """The body of every experiments/train_*.py `main`: quiet logging, expected errors as one FATAL
    line (`trainers.setup.one_line_errors`), exit status `EXIT_PREEMPTED` (75) when a signal stopped
    the run after saving, else a last line "`name` finished at step N: key=value, ..." over `keys`
    of the final metrics row (or "Nothing to do" when the workdir was already at num_steps)."""
    from absl import app

    from rlhf_jax.trainers.setup import EXIT_PREEMPTED, one_line_errors

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_script_logging()
    from rlhf_jax.metrics import check_wandb

    with one_line_errors():
        check_wandb(config)  # before data loading and compilation
        result = train(config, workdir)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)
    if not result.last_row:
        print(f"Nothing to do: {workdir} is already at step {result.step} (raise --config.num_steps to continue).")
        return
    print(f"{name} finished at step {result.step}: " + ", ".join(
        f"{k}={result.last_row[k]:.4g}" for k in keys if k in result.last_row))
