"""The `sasrec` command: one entry point, one subcommand per step of the data flow.

Each command module exposes ``register(subparsers)`` that adds its subcommands and sets
``func`` on them. Command modules import heavy libraries (TensorFlow, Keras) only inside
their functions, so ``sasrec --help`` and the data commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.errors import InputError

# Order here is the order in `sasrec --help`.
COMMAND_MODULES = (
    "pipelines.commands",  # synth, download, prepare
    "sasrec.commands",  # train, evaluate, export, score
    "serving.commands",  # serve, recommend
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sasrec",
        description="Sequential recommendation with SASRec: raw logs -> dataset -> model -> gRPC service.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except InputError as exc:
        print(f"sasrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sasrec {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
