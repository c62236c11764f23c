"""The ``mrprune`` command: ``mrprune bench ...`` (microbenchmarks), ``mrprune viz ...`` (kept-token pictures)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "bench": ("mrprune.bench", "time every op and method against eager PyTorch"),
    "viz": ("mrprune.viz", "draw which tokens a pruner keeps over an image"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mrprune", description="Visual token pruning kernels for multimodal LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(module=module)
        try:
            importlib.import_module(module).add_arguments(sub)
        except ImportError as error:  # a subcommand whose optional dependencies are missing
            sub.set_defaults(unavailable=str(error))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "unavailable", None):
        parser.error(f"mrprune {args.command} is unavailable: {args.unavailable}")
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
