"""CLI subcommands; each module has ``register(subparsers)`` and maps its commands onto the module doing the work:
``anchors`` (klas.families), ``stages`` (one command per stage of klas.stages), ``pipeline`` (klas.pipeline:
``run``, ``config``), ``runtime`` (klas_runtime: ``pick``, ``predict``, ``profile``, ``verify``), ``research``
(klas.research.compare) and ``study`` (klas.research.study, report)."""
COMMAND_MODULES = ("anchors", "stages", "pipeline", "runtime", "research", "study")
