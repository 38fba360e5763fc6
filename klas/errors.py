"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class KlasError(Exception):
    """A user-facing error: bad input, missing file, wrong flag. The message is one line and names the culprit."""
