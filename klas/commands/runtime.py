"""``klas profile`` / ``klas pick`` / ``klas predict`` / ``klas verify``: budget-driven use of an exported zoo. These
are the torch-free runtime's own subcommands (``klas_runtime.cli``, also the ``klas-runtime`` command); the export
itself is the ``klas export`` stage command (``klas.commands.stages``)."""
from __future__ import annotations

from klas_runtime import cli as runtime_cli


def register(sub) -> None:
    runtime_cli.register(sub)  # profile, pick, predict, verify: the same subcommands as `klas-runtime`
