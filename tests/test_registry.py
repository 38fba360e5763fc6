"""The one registry type behind tasks, selection methods and runtime entries (``klas_runtime.registry``)."""
import pytest

from klas.errors import KlasError
from klas_runtime.errors import ZooError
from klas_runtime.registry import Registry


def test_registry_registers_replaces_refuses_and_names_the_registered_ones():
    r = Registry("widget", KlasError, "pip install more-widgets")
    assert r.register("b", 2) == 2 and r.register("a", 1) == 1
    assert r.names() == ("b", "a") and r.values() == (2, 1) and "a" in r and "c" not in r  # registration order
    r.register("a", 10)  # a later registration replaces
    assert r.get("a") == 10
    with pytest.raises(KlasError, match=r"^widget 'a' is already registered"):
        r.register("a", 11, replace=False)
    with pytest.raises(KlasError, match=r"^widget 'c': not registered; registered: b, a \(pip install more-widgets\)$"):
        r.get("c")
    with pytest.raises(KlasError, match="needs a name"):
        r.register("", 0)
    c = r.copy()
    c.register("c", 3)
    c.remove("b")
    c.remove("never")
    assert c.names() == ("a", "c") and r.names() == ("b", "a")  # the copy's changes stay in the copy
    with pytest.raises(ZooError, match=r"^gadget 'x': not registered; registered: none$"):
        Registry("gadget").get("x")
