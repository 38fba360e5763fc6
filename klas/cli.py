"""The ``klas`` command: argparse subcommands that parse flags and call the stages; no logic lives here."""
from __future__ import annotations

import argparse
import importlib
import sys

from klas_runtime.errors import ZooError  # the base of KlasError: runtime (manifest, pick, ...) errors too


def build_parser() -> argparse.ArgumentParser:
    from klas import __version__
    from klas.commands import COMMAND_MODULES

    p = argparse.ArgumentParser(prog="klas", description="KL-divergence based Anchor Stitching: from a family of "
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ZooError as e:
        print(f"klas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klas: interrupted (finished stages and checkpoints are kept; run the same command to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
