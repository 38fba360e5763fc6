"""The ``klas`` command: argparse subcommands that parse flags and call the stages; no logic lives here."""
from __future__ import annotations

import argparse
import importlib
import sys



class OneLineParser(argparse.ArgumentParser):
    """Usage errors (unknown flag, bad choice, missing argument) as one line naming the flag, then exit 2 -- like
    every other klas error -- instead of argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from klas import __version__
    from klas.commands import COMMAND_MODULES

    p = OneLineParser(prog="klas", description="KL-divergence based Anchor Stitching: from a family of "
                                "pretrained models to a zoo of stitched deployments.")
    p.add_argument("--version", action="version", version=f"klas {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"klas.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"klas.commands.{name}":
                raise
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from klas.research import register_all
    from klas_runtime.cli import run_command

    register_all()  # the research metrics and selection methods are choices the flags list

    return run_command(build_parser(), argv, "interrupted (finished stages and checkpoints are kept; run the same "
                       "command to resume)")


if __name__ == "__main__":
    sys.exit(main())
