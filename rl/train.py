"""`texforce train` / `python -m rl.train`: the entry `ray job submit` runs.

    texforce train --config configs/tiny.yaml [section.key=value ...]
    texforce train --resume runs/tiny [num_epochs=30]
    texforce train --config configs/tiny.yaml --print-config   # every setting the run would use, documented

The training loop lives in actors.driver (it needs Ray); it is imported only when a run starts,
so `rl` stays importable without Ray. Everything checkable is checked first (`rl.preflight`),
so a bad run fails with one line and leaves no run directory behind.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from rl.config import ConfigError, TexForceConfig, documented_yaml, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (defaults: the published TexForce settings)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    parser.add_argument("--print-config", action="store_true",
                        help="print every setting the run would use (defaults, --config, overrides) as YAML, "
                             "each under its doc line, and exit without starting it")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train a LoRA on a reward: PPO (TexForce/DDPO) or a gradient learner (train.algorithm)"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_run_config(args)
    if args.print_config:
        print(documented_yaml(config), end="")
        return 0
    if not args.resume:  # before any check that takes time
        from rl.run_dir import RunDirectory

        RunDirectory.for_config(config).refuse_if_taken()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from actors.driver import summarize, train  # train() runs the preflight checks first

    # SIGTERM (kill, a scheduler's stop) ends the run as Ctrl-C does, through its cleanup: outputs flushed, actors
    # stopped, the resume command logged. Ray's driver sets the same kind of handler once it connects.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run_dir = train(config, resume=args.resume)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summarize(run_dir))
    return 0


def _exit_on_sigterm(signum: int, frame) -> None:
    sys.exit(128 + signum)


WEIGHT_DEFINING_KEYS = ("train.algorithm", "lora.policy", "lora.rank", "lora.alpha", "lora.text_encoder_targets",
                        "lora.unet_targets")
"""What the checkpoints' LoRA and optimizer state were built for: a resume cannot change them. (`model.pretrained`
may: the same model can sit at another path on a cluster's nodes.)"""

HELD_OUT_KEYS = ("evaluation.prompts_file", "evaluation.num_seeds", "evaluation.seed_base", "evaluation.eta",
                 "evaluation.reward", "sample.num_steps", "sample.guidance_scale", "sample.negative_prompt",
                 "sample.height", "sample.width")
"""What decides the held-out images and their scores, with sample.eta where evaluation.eta is null and reward.spec
where evaluation.reward is: a run's later evaluations are paired image by image with its base model's, so a resume
of a run with held-out prompts cannot change them."""


def held_out_keys(config: TexForceConfig) -> tuple[str, ...]:
    """HELD_OUT_KEYS, and the settings the evaluation falls back to where it names none of its own."""
    return (HELD_OUT_KEYS + (("sample.eta",) if config.evaluation.eta is None else ())
            + (("reward.spec",) if config.evaluation.reward is None else ()))


RUN_LOCATION_KEYS = ("output_dir", "run_name")
"""Where a new run's folder goes: a resume goes on in the folder it is given, whatever they say."""


def _value(config: TexForceConfig, key: str):
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def check_resume_overrides(saved: TexForceConfig, resumed: TexForceConfig, run_path) -> None:
    """An override that the run's checkpoints or its held-out evaluations cannot follow is a user error before any
    work (else: a shape mismatch deep in loading, or a held-out gain against other images or another reward)."""
    held_out = held_out_keys(saved) if saved.evaluation.prompts_file is not None else ()
    for key in (*RUN_LOCATION_KEYS, *WEIGHT_DEFINING_KEYS, *held_out):
        before, after = _value(saved, key), _value(resumed, key)
        if before == after:
            continue
        if key in RUN_LOCATION_KEYS:  # the run would go on in place and its config.yaml say it is elsewhere
            raise ConfigError(f"--resume {run_path}: {key} cannot change in a resume (the run goes on in "
                              f"{run_path}); to continue it elsewhere, copy that folder and resume the copy")
        if key in WEIGHT_DEFINING_KEYS:
            why, fix = "its checkpoints' LoRA was trained with", "start a new run for that"
        else:
            why = "the held-out gains are paired with the base model's images and scores at"
            fix = "evaluate the final LoRA under other settings with `texforce eval`"
        raise ConfigError(f"--resume {run_path}: {key} cannot change in a resume ({why} {key}={before!r}, not "
                          f"{after!r}); {fix}")


def check_relative_paths_found(config: TexForceConfig, run_path) -> None:
    """A resume reads the relative paths of the run's config.yaml from the directory it runs in, as the run did: from
    another directory a prompt or reward file is not found, and the fix is to resume from where the run started or to
    override the path."""
    files = {"prompts.file": config.prompts.file, "evaluation.prompts_file": config.evaluation.prompts_file,
             **{f"reward.paths.{key}": value for key, value in config.reward.paths.items()}}
    for key, value in files.items():
        path = Path(value).expanduser() if value else None
        if path is not None and not path.is_absolute() and not path.exists():
            raise ConfigError(f"--resume {run_path}: {key}={value} (its config.yaml's) is a relative path, not found "
                              f"from {Path.cwd()}; resume from the directory the run started in, or pass "
                              f"{key}=ABSOLUTE_PATH")


def load_run_config(args: argparse.Namespace) -> TexForceConfig:
    """The config of a new run (`--config` + overrides) or of the run `--resume` continues
    (its config.yaml + overrides)."""
    if args.resume:
        from rl.run_dir import RunDirectory

        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; pass overrides, not --config")
        run = RunDirectory(args.resume)
        if not run.config_path.is_file():
            raise ConfigError(
                f"--resume {run.path} is not a run directory (no config.yaml); pass the output_dir/run_name "
                "folder that `texforce train` created"
            )
        config = load_config(run.config_path, args.overrides)
        check_resume_overrides(load_config(run.config_path), config, run.path)
        check_relative_paths_found(config, run.path)
        if run.has_progress() and not run.complete_checkpoints():
            raise ConfigError(f"--resume {run.path} has metrics but no complete checkpoint to go on from, and a "
                              "resume from epoch 0 would overwrite them; start a new run (another run_name)")
        finished = run.checkpointed_epochs()
        if config.num_epochs < finished:
            raise ConfigError(f"--resume {run.path} has finished {finished} epochs (its last checkpoint is "
                              f"{run.latest_checkpoint().name}); num_epochs={config.num_epochs} would end before "
                              f"that: pass num_epochs={finished} or more")
        return config
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    from rl.cli import CommandLineParser, parse_command_line, run_command

    parser = CommandLineParser(prog="python -m rl.train", description="Train a LoRA on a reward.")
    add_arguments(parser)
    parser.set_defaults(func=run, command="train")
    return run_command(parse_command_line(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
