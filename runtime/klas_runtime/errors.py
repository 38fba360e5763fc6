"""The runtime's one exception type: the CLI prints its message on one line and exits non-zero."""


class ZooError(Exception):
    """A user-facing error: bad manifest, missing or altered model file, budget nothing meets, wrong input. The
    message is one line and names the culprit. ``klas.errors.KlasError`` derives from it."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type name when it has none):
    how a foreign error (onnxruntime's, Pillow's) is quoted inside a one-line ZooError."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
