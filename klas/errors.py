"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero.

``KlasError`` derives from the torch-free runtime's ``klas_runtime.errors.ZooError`` (raised by manifest, runtime
and profile code), so ``except ZooError`` catches both; the ``klas`` command does.
"""
from klas_runtime.errors import ZooError


class KlasError(ZooError):
    """A user-facing error: bad input, missing file, wrong flag. The message is one line and names the culprit."""


class BadSetting(KlasError, ValueError):
    """A bad value of a setting that also reaches library code (an environment variable read by an op): one line
    in the CLI like every KlasError, and still a ValueError to Python callers."""


def file_error(path, e: OSError, expected: str) -> KlasError:
    """The one line for an OS error on reading ``path``; ``expected`` says what it should be ("a TOML config
    file")."""
    if isinstance(e, FileNotFoundError):
        return KlasError(f"{path}: file not found (expected {expected})")
    if isinstance(e, IsADirectoryError):
        return KlasError(f"{path}: is a directory, expected {expected}")
    if isinstance(e, PermissionError):
        return KlasError(f"{path}: permission denied")
    return KlasError(f"{path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
