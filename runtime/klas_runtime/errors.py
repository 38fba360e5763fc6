"""The runtime's one exception type: the CLI prints its message on one line and exits non-zero."""


class ZooError(Exception):
    """A user-facing error: bad manifest, missing or altered model file, budget nothing meets, wrong input. The
    message is one line and names the culprit. ``klas.errors.KlasError`` derives from it."""
