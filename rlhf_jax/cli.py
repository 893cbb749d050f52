"""What the experiments/*.py scripts share: the locked `--config` flag and quiet logging.

Scripts import this module (and the one trainer they run), never the trainers package just to
parse flags.
"""
from __future__ import annotations

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
            return (f"FATAL Flags parsing error: --config.{key} was renamed: use "
                    f"--config.{section}{RENAMED_KEYS[head]}{'.' + rest if rest else ''}")
    return None


def define_config_flag(default: str, help_text: str):
    """`--config` flag of the experiments/*.py scripts: a locked ml_collections config file
    (`config_flags.DEFINE_config_file`), so `--config.<key>=value` may only set existing keys to
    values of their type. A wrong type is absl's one-line `FATAL Flags parsing error`; an unknown
    key (which ml_collections reports as a long AttributeError traceback while the flag is defined)
    or a renamed one becomes the same kind of one-line error naming the key, exit code 1."""
    from ml_collections import config_flags

    renamed = renamed_key_error(sys.argv[1:])
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
    every save at INFO, which buries the progress bars), and without Orbax's warning on each
    read-only restore of an earlier stage's checkpoint (that is how stages hand off)."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(lambda record: "Given directory is read only" not in record.getMessage())
