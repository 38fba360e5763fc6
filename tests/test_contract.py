"""``klas.contract.overrides``: a config that differs from its base only in defaults says only those."""
from dataclasses import dataclass, fields

import pytest

from klas.contract import build, key_fields, overrides, setting, specs
from klas.errors import KlasError


@dataclass(frozen=True)
class Base:
    epochs: int = setting(1, "training epochs", ge=1)
    lr: float = setting(1e-3, "peak learning rate", gt=0)
    mode: str = setting("a", "a mode", choices=("a", "b"))


@dataclass(frozen=True)
@overrides(epochs=(7, "finetuning epochs"), mode="b")
class Child(Base):
    extra: int = setting(3, "one more", ge=0)


def test_overrides_changes_defaults_and_keeps_ranges_choices_and_order():
    assert [f.name for f in fields(Child)] == ["epochs", "lr", "mode", "extra"]
    assert Child() == Child(epochs=7, lr=1e-3, mode="b", extra=3) and Base().epochs == 1  # the base is untouched
    by = {s.dotted: s for s in specs(Child)}
    assert by["epochs"].meta["help"] == "finetuning epochs" and by["lr"].meta["help"] == "peak learning rate"
    assert by["epochs"].meta["ge"] == 1 and by["mode"].allowed() == ("a", "b")
    with pytest.raises(KlasError, match=r"epochs = 0: expected >= 1"):
        build(Child, {("epochs",): 0}, {("epochs",): "epochs"})
    with pytest.raises(KlasError, match=r"mode = 'c': expected one of a, b"):
        build(Child, {("mode",): "c"}, {("mode",): "mode"})
    assert key_fields(Child()) == dict(epochs=7, lr=1e-3, mode="b", extra=3)
    with pytest.raises(TypeError, match=r"no settings \['nope'\]"):
        @overrides(nope=1)
        class Bad(Base):
            pass
