"""The `texforce` command line: one entry, one subcommand per job.

Heavy imports (diffusers, ray, reward models) happen inside each subcommand, so `texforce --help`
loads torch only (the rewards and the toy model's builder import it; ~1.5 s) and `rl` stays importable
without Ray.

A user error is one line on stderr and exit code 2, before any work starts; a traceback is
for bugs. `run_command` is that rule, for this entry and for `python -m rl.train` and
`python -m tune.cli`: the exception types in `USER_ERRORS` (exit 2) and `RUN_STOPS` (exit 1)
print as `texforce <command>: <message>`, anything else propagates.
"""
from __future__ import annotations

import argparse
import sys

USER_ERRORS: tuple[str, ...] = (
    "rl.config.ConfigError",  # a config key or value, an override, a command-line option
    "rl.models.ModelNotFoundError",  # the model directory or one of its files
    "rl.prompts.PromptsError",  # the prompt file
    "rl.run_dir.RunExistsError",  # a new run pointed at an existing run's directory
    "rewards.base.RewardError",  # a reward spec, a reward's files or packages, `score` input
    "tune.lora_io.LoraFormatError",  # a LoRA file, or LoRAs that do not fit together or the model
    "actors.topology.InsufficientResourcesError",  # the cluster cannot host the requested actors
)
RUN_STOPS: tuple[str, ...] = (
    "actors.driver.TrainingStopped",  # a run that cannot go on; its message says how to resume
)
"""User-error exception types, as "module.Name". Named, not imported, so that this module stays
light and Ray-free: an error can only be of a type whose module is loaded (`user_error_types`)."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` states each option's default, unless it has none (None, an empty list, a flag) or its help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


class CommandLineParser(argparse.ArgumentParser):
    """argparse's parser with a bad command line as one line and exit code 2, as every other user error (argparse
    prints its usage first); its subcommands' parsers are of this class too (`add_subparsers` takes the parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with config overrides taken wherever they stand: argparse reads a positional list
    in one piece, so `train a=1 --config C b=2` left `b=2` unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # in the order given: a later override wins
    elif extra:  # said by the subcommand's parser: its name, and the --help that lists its options
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        named = subcommands[0].choices.get(getattr(args, subcommands[0].dest, None)) if subcommands else None
        (named or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def loaded_types(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The classes named in `names` whose modules are imported in this process."""
    types = []
    for dotted in names:
        module_name, _, name = dotted.rpartition(".")
        module = sys.modules.get(module_name)
        if module is not None:
            types.append(getattr(module, name))
    return tuple(types)


def _storage_problem(error: OSError) -> str | None:
    from rl.run_dir import storage_problem  # only once an OSError is here: `--help` stays light

    return storage_problem(error, "the command's outputs")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand (`args.func`). A user error becomes one line on stderr and exit
    code 2; a run that stops (RUN_STOPS) one line and exit code 1; Ctrl-C one line and 130 (the shell's
    128 + SIGINT); a full or read-only disk one line and 1; anything else propagates."""
    from rl.output_lock import release_output_dirs

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a bug: what was kept is logged where it is known
        print(f"texforce {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, loaded_types(USER_ERRORS)):
            code, message = 2, str(error)
        elif isinstance(error, loaded_types(RUN_STOPS)):
            code, message = 1, str(error)
        elif isinstance(error, OSError) and (problem := _storage_problem(error)):
            code, message = 1, f"{problem}, then run the command again"
        else:
            raise
        message = " ".join(message.split())  # one line, whatever the message held
        print(f"texforce {args.command}: {message}", file=sys.stderr)
        return code
    finally:
        release_output_dirs()  # the command's output directories (rl.output_lock)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="texforce",
        description="Reward fine-tuning of text-to-image diffusion models (TexForce, DDPO, LoRA fusion).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from toyworld import tiny

    tiny.add_subcommand(sub)

    from rl import train

    train.add_subcommand(sub)

    from rewards import cli as rewards_cli

    rewards_cli.add_subcommands(sub)

    from tune import cli as tune_cli

    tune_cli.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_command_line(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
