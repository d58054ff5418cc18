"""`texforce train` / `python -m rl.train`: the entry `ray job submit` runs.

    texforce train --config configs/tiny.yaml [section.key=value ...]
    texforce train --resume runs/tiny [num_epochs=30]

The training loop lives in actors.driver (it needs Ray); it is imported only when a run starts,
so `rl` stays importable without Ray.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rl.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (defaults: the published TexForce settings)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a LoRA with PPO (TexForce/DDPO) on a reward")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--resume uses the run's own config.yaml; pass overrides, not --config")
            config = load_config(Path(args.resume) / "config.yaml", args.overrides)
        else:
            config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"texforce train: {error}", file=sys.stderr)
        return 2
    from actors.driver import summarize, train

    run_dir = train(config, resume=args.resume)
    print(summarize(run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.train", description="Train a LoRA with PPO on a reward.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
