"""Named plug-ins of one kind (tasks, selection methods, baseline metrics, runtime entries): one registry type.

Torch-free, so the runtime and klas share it. A lookup of a name nobody registered is one line naming the kind, the
name and the registered ones.
"""
from __future__ import annotations

from typing import Generic, TypeVar

from klas_runtime.errors import ZooError

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind``: what is registered, for messages ("selection method"); ``error``: the one-line exception type;
    ``hint``: appended to the not-registered message (how to get more)."""

    def __init__(self, kind: str, error: type[Exception] = ZooError, hint: str = ""):
        self.kind, self.error, self.hint = kind, error, hint
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = True) -> T:
        """Register ``item`` under ``name``; a second registration of the name replaces the first, or (``replace``
        False) is refused."""
        if not name:
            raise self.error(f"a {self.kind} needs a name")
        if name in self._items and not replace:
            raise self.error(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        """Forget ``name`` (nothing when it is not registered)."""
        self._items.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def values(self) -> tuple[T, ...]:
        return tuple(self._items.values())

    def copy(self) -> "Registry[T]":
        """A registry of the same kind holding the same items, whose registrations do not reach this one."""
        new = Registry(self.kind, self.error, self.hint)
        new._items = dict(self._items)
        return new

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        """The item registered as ``name``, or one line naming the registered ones."""
        if name not in self._items:
            raise self.error(f"{self.kind} {name!r}: not registered; registered: {', '.join(self._items) or 'none'}"
                             + (f" ({self.hint})" if self.hint else ""))
        return self._items[name]
