"""Families as data: a registry of anchor configurations, and ``create_family`` that builds them through timm."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path


from klas.errors import KlasError
from klas.families.blockview import BlockView, block_view

_EMBEDDED_WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class AnchorCfg:
    """One anchor: a timm architecture name plus constructor overrides; weights from the hub or a local file."""

    name: str
    arch: str
    model_args: dict = field(default_factory=dict)
    embedded_file: str | None = None  # file under klas/families/weights/ shipped with the package


@dataclass(frozen=True)
class FamilyCfg:
    """A family: anchors of one architecture type, ordered by cost, and the input they expect."""

    name: str
    anchors: tuple[AnchorCfg, ...]
    input_shape: tuple[int, int, int]
    dataset: str = "imagenet"
    num_classes: int = 1000
    description: str = ""

    @property
    def embedded(self) -> bool:
        return all(a.embedded_file for a in self.anchors)


@dataclass
class Family:
    """Built anchors (block views), ordered by FLOPs, smallest first."""

    cfg: FamilyCfg
    anchors: list[BlockView]

    @property
    def name(self) -> str:
        return self.cfg.name

    def __getitem__(self, key: int | str) -> BlockView:
        if isinstance(key, int):
            return self.anchors[key]
        for a in self.anchors:
            if a.name == key:
                return a
        raise KlasError(f"family {self.name}: no anchor {key!r}; anchors: {', '.join(a.name for a in self.anchors)}")

    def __len__(self) -> int:
        return len(self.anchors)

    def __iter__(self):
        return iter(self.anchors)


_FAMILIES: dict[str, FamilyCfg] = {}


def register_family(cfg: FamilyCfg) -> FamilyCfg:
    _FAMILIES[cfg.name] = cfg
    return cfg


def list_families(pattern: str = "*") -> list[str]:
    return sorted(n for n in _FAMILIES if fnmatch.fnmatch(n, pattern))


def get_family_cfg(name: str) -> FamilyCfg:
    if name not in _FAMILIES:
        raise KlasError(f"family {name!r}: unknown; registered: {', '.join(list_families())}")
    return _FAMILIES[name]


def _weights_for(anchor: AnchorCfg, weights: str | Path | dict | None) -> Path | None:
    """Resolve a local weights file for one anchor: a dict name->file, a directory holding <name>.safetensors/.pth,
    or (embedded families) the file shipped in the package."""
    if isinstance(weights, dict):
        return Path(weights[anchor.name]) if anchor.name in weights else None
    if weights is not None:
        root = Path(weights)
        if root.is_file():
            raise KlasError(f"{root}: pass a directory of per-anchor files or a dict name->file for a family")
        for ext in (".safetensors", ".pth", ".pt", ".bin"):
            if (root / f"{anchor.name}{ext}").is_file():
                return root / f"{anchor.name}{ext}"
        raise KlasError(f"{root}: no weights file for anchor {anchor.name!r} "
                        f"(expected {anchor.name}.safetensors or .pth)")
    if anchor.embedded_file:
        path = _EMBEDDED_WEIGHTS / anchor.embedded_file
        if not path.is_file():
            raise KlasError(f"{path}: embedded weights missing (train them with `klas anchors train {anchor.name}`)")
        return path
    return None


def create_anchor(anchor: AnchorCfg, input_shape, pretrained: bool = False, weights=None,
                  num_classes: int | None = None) -> BlockView:
    """Build one anchor with timm; ``pretrained`` loads hub weights, or a local file when one is given."""
    import timm

    kwargs = dict(anchor.model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    local = _weights_for(anchor, weights) if (pretrained or weights is not None) else None
    if local is not None:
        if not local.is_file():
            raise KlasError(f"{local}: weights file not found for anchor {anchor.name!r}")
        # timm's own loader, pointed at a local file: it applies the family's checkpoint filter (pos-embed
        # resizing, classifier adaptation), exactly as for hub weights.
        overlay = dict(file=str(local))
        if anchor.embedded_file:
            # klas-trained files carry the family's own classifier: tell timm so it keeps it (not a 1000-class head)
            overlay.update(num_classes=anchor.model_args.get("num_classes"), input_size=tuple(input_shape))
        model = timm.create_model(anchor.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = timm.create_model(anchor.arch, pretrained=pretrained, **kwargs)
    model.eval()
    view = block_view(model, anchor.name, input_shape)
    view.weights_file = local  # the file the user's weights came from (None: hub or random): exported as given
    return view


def create_family(name: str, pretrained: bool = False, weights: str | Path | dict | None = None,
                  num_classes: int | None = None, input_shape: tuple[int, int, int] | None = None,
                  anchors: list[str] | None = None) -> Family:
    """Build the anchors of family ``name``, ordered by FLOPs (smallest first).

    Args:
        pretrained: load pretrained weights (the hub for timm families, the shipped files for embedded ones).
        weights: a directory of ``<anchor>.safetensors|.pth`` files or a dict anchor -> file, for offline use.
        num_classes: replace the classifier (e.g. to probe a new dataset); default: the family's own.
        input_shape: (C, H, W) the block shapes and FLOPs are measured at; default: the family's own.
        anchors: restrict to these anchor names.
    """
    cfg = get_family_cfg(name)
    shape = tuple(input_shape) if input_shape else cfg.input_shape
    chosen = [a for a in cfg.anchors if anchors is None or a.name in anchors]
    if anchors is not None and len(chosen) != len(set(anchors)):
        known = ", ".join(a.name for a in cfg.anchors)
        raise KlasError(f"family {name}: unknown anchor in {anchors}; anchors: {known}")
    views = [create_anchor(a, shape, pretrained=pretrained, weights=weights, num_classes=num_classes)
             for a in chosen]
    views.sort(key=lambda v: v.flops)
    return Family(cfg, views)


