"""What the experiments/*.py scripts share: the locked `--config` flag and quiet logging.

Scripts import this module (and the one trainer they run), never the trainers package just to
parse flags.
"""
from __future__ import annotations

import pathlib
import sys

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


def define_config_flag(default: str, help_text: str):
    """`--config` flag of the experiments/*.py scripts: a locked ml_collections config file
    (`config_flags.DEFINE_config_file`), so `--config.<key>=value` may only set existing keys to
    values of their type. A wrong type is absl's one-line `FATAL Flags parsing error`; an unknown
    or renamed key is caught before absl parses the flags (ml_collections would report it as a long
    AttributeError traceback) and becomes the same kind of one-line error naming the key and the
    closest existing ones, exit code 1."""
    from ml_collections import config_flags

    renamed = renamed_key_error(sys.argv[1:])
    if renamed is None:
        try:
            renamed = unknown_key_error(load_config_file(config_file_arg(sys.argv[1:], default)), sys.argv[1:])
        except ValueError as error:
            renamed = f"FATAL Flags parsing error: {error}"
    if renamed:
        sys.stderr.write(renamed + "\n")
        sys.exit(1)
    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
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
