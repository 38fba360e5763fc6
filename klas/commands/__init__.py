"""CLI subcommands, one module per pipeline area; each module has ``register(subparsers)``.

Modules only parse flags and call library functions. Listed in pipeline order; a module that does not exist yet
is skipped, so areas land independently.
"""
COMMAND_MODULES = ("zoo", "selection", "supernet", "export", "pipeline", "study")
