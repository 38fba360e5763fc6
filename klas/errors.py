"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero.

``KlasError`` derives from the torch-free runtime's ``klas_runtime.errors.ZooError`` (raised by manifest, runtime
and profile code), so ``except ZooError`` catches both; the ``klas`` command does.
"""
from klas_runtime.errors import ZooError


class KlasError(ZooError):
    """A user-facing error: bad input, missing file, wrong flag. The message is one line and names the culprit."""
