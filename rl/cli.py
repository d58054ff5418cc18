"""The `texforce` command line: one entry, one subcommand per job.

Heavy imports (torch, diffusers, ray) happen inside each subcommand, so `texforce --help`
is instant and `rl` stays importable without Ray.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
