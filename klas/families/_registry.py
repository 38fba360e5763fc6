"""Families as data: a registry of anchor configurations, and ``create_family`` that builds them through timm."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path


from klas.errors import KlasError
from klas.families.blockview import BlockView, block_view, input_note

_EMBEDDED_WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class AnchorCfg:
    """One anchor: a timm architecture name plus constructor overrides; weights from the hub or a local file."""

    name: str
    arch: str
    model_args: dict = field(default_factory=dict)
    embedded_file: str | None = None  # file under klas/families/weights/ shipped with the package
    # a family from the config: an absolute local file (safetensors or a torch checkpoint), "hf-hub:<org>/<name>",
    # "timm" (the architecture's default pretrained tag) or "timm:<tag>"; None: the hub for registered families
    weights: str | None = None


@dataclass(frozen=True)
class FamilyCfg:
    """A family: anchors of one architecture type, ordered by cost, and the input they expect."""

    name: str
    anchors: tuple[AnchorCfg, ...]
    input_shape: tuple[int, int, int]
    dataset: str = "imagenet"
    num_classes: int = 1000
    description: str = ""
    # the input spec (any of channels, size, mean, std, interpolation, crop_pct, crop_mode); the rest comes from
    # timm's pretrained cfg of the first anchor (``data_config``)
    input: dict = field(default_factory=dict)
    source: str = ""  # where a family from a config was defined ("" for registered ones)
    task: str = "image-classification"  # the task plug-in (klas.tasks) that says what the anchors do

    @property
    def embedded(self) -> bool:
        return all(a.embedded_file for a in self.anchors)

    @property
    def data_config(self) -> dict:
        """timm-style data config (``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``,
        ``crop_mode``): the input spec where it says, else timm's pretrained cfg of the first anchor (what
        ``timm.data.resolve_model_data_config`` gives for the built model), at the family's ``input_shape``."""
        return resolve_data_config(self, self.input_shape)

    def input_report(self) -> str:
        """One line for the run summary: the one input size of the family and its preprocessing, and the anchors
        whose native size (timm's pretrained cfg) differs from it."""
        import math

        dc = self.data_config
        c, h, w = dc["input_size"]
        scale = math.floor(min(h, w) / dc["crop_pct"])
        geo = "no resize or crop" if scale == min(h, w) else \
            f"{dc['interpolation']} resize to {scale} + {dc['crop_mode']} crop {h}x{w} (crop_pct {dc['crop_pct']:g})"
        native = []
        for a in self.anchors:
            try:
                import timm
                pc = timm.get_pretrained_cfg(a.arch)
                size = tuple(pc.input_size[1:]) if pc is not None and pc.input_size else None
            except Exception:  # noqa: BLE001
                size = None
            # pretrained weights (the hub) have a native size; a user's own file does not say
            hub = not a.embedded_file and (a.weights is None or is_hub_id(a.weights))
            if hub and size is not None and size != (h, w):
                native.append(f"{a.name} {size[0]}x{size[1]}")
        mean = ", ".join(f"{v:g}" for v in dc["mean"])
        std = ", ".join(f"{v:g}" for v in dc["std"])
        return (f"input {c}x{h}x{w} for every anchor ({'grayscale' if c == 1 else 'RGB'}; {geo}; mean ({mean}), "
                f"std ({std}))" + (f"; native sizes differ: {', '.join(native)}" if native else ""))


@dataclass
class Family:
    """Built anchors (block views), ordered by FLOPs, smallest first."""

    cfg: FamilyCfg
    anchors: list[BlockView]

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The one (C, H, W) every anchor runs at: the family's own, or the one ``create_family`` was given."""
        return self.anchors[0].input_shape if self.anchors else self.cfg.input_shape

    @property
    def input_note(self) -> str:
        """One line for reports: the input size, and the anchors' native sizes where they differ from it."""
        return input_note(self.anchors)

    @property
    def data_config(self) -> dict:
        """The one timm-style data config every anchor is fed with (``FamilyCfg.data_config``) at the size the
        family runs at; ``klas.data.open_split`` builds its transforms from it."""
        return resolve_data_config(self.cfg, self.input_shape,
                                   self.anchors[0].model if self.anchors else None)

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


_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_data_config(cfg: FamilyCfg, input_shape, model=None) -> dict:
    """The family's data config: timm's ``resolve_model_data_config(model)`` (or, without a built model, the same
    from the first anchor's pretrained cfg), overridden by the family's input spec, at ``input_shape``; mean/std of
    a 3-channel pretrained cfg are averaged for a 1-channel family."""
    from timm.data import resolve_data_config as timm_resolve

    if model is not None:
        from timm.data import resolve_model_data_config
        base = resolve_model_data_config(model)
    else:
        a = cfg.anchors[0]
        tag = a.weights.split(":", 1)[1] if a.weights and a.weights.startswith("timm:") else None
        pcfg = None
        try:
            import timm
            pcfg = timm.get_pretrained_cfg(f"{a.arch}.{tag}" if tag else a.arch)
        except Exception:  # noqa: BLE001 -- an unknown arch is reported when the family is built
            pcfg = None
        base = timm_resolve(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    out = {k: base.get(k) for k in _DATA_KEYS}
    spec = cfg.input or {}
    from klas.data.datasets import native_data_config
    native = native_data_config(cfg.dataset)
    if native is not None:
        # NOTE: a family on a built-in dataset (Fashion-MNIST, CIFAR-100) was trained on its images as they are,
        # with the dataset's statistics (klas-trained anchors, the usual CIFAR recipe); where its input spec is
        # silent these are the defaults, not the architecture's ImageNet pretrained cfg (statistics, resize + crop)
        spec = dict(native, **{k: v for k, v in spec.items() if v is not None})
    for k in ("interpolation", "mean", "std", "crop_pct", "crop_mode"):
        if spec.get(k) is not None:
            out[k] = spec[k]
    c = int(input_shape[0])
    out["input_size"] = tuple(int(v) for v in input_shape)
    for k in ("mean", "std"):
        v = tuple(float(x) for x in out[k])
        if len(v) != c:
            if c == 1:
                v = (sum(v) / len(v),)
            elif len(v) == 1:
                v = v * c
            else:
                raise KlasError(f"family {cfg.name}: {k} has {len(v)} values for {c} input channels; set "
                                f"[family.input] {k}")
        out[k] = v
    out["crop_pct"] = float(out["crop_pct"] if out["crop_pct"] is not None else 1.0)
    out["crop_mode"] = out["crop_mode"] or "center"
    out["interpolation"] = out["interpolation"] or "bilinear"
    return out


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
    if anchor.weights and not is_hub_id(anchor.weights):
        return Path(anchor.weights)
    if anchor.embedded_file:
        path = _EMBEDDED_WEIGHTS / anchor.embedded_file
        if not path.is_file():
            raise KlasError(f"{path}: embedded weights missing (train them with `klas anchors train {anchor.name}`)")
        return path
    return None


def is_hub_id(weights: str | None) -> bool:
    """``hf-hub:<org>/<name>``, ``timm`` or ``timm:<tag>``: weights timm fetches (online users)."""
    return bool(weights) and (weights.startswith("hf-hub:") or weights == "timm" or weights.startswith("timm:"))


def read_state_dict(path: Path, anchor: str = "") -> dict:
    """The tensors of a weights file: safetensors, or a PyTorch checkpoint read with ``weights_only=True`` (a
    ``state_dict`` / ``model`` entry is unwrapped, as the export's bit-for-bit check does); one-line errors."""
    who = f" (anchor {anchor!r})" if anchor else ""
    if path.is_dir():  # a save_pretrained folder: its (possibly sharded) safetensors files together
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise KlasError(f"{path}: no .safetensors weights in the folder{who}")
        return {k: v for f in shards for k, v in read_state_dict(f, anchor).items()}
    if not path.is_file():
        raise KlasError(f"{path}: weights file not found{who}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            import torch
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict):
                sd = sd.get("state_dict", sd.get("model", sd))
    except Exception as e:  # noqa: BLE001 -- any decoding failure is the file's fault
        lines = [x for x in str(e).splitlines() if x.strip()]
        raise KlasError(f"{path}: unreadable weights file{who} ({type(e).__name__}: "
                        f"{(lines[0] if lines else '')[:160]})") from None
    import torch
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise KlasError(f"{path}: not a state dict of tensors{who} (expected safetensors, or a torch checkpoint "
                        f"holding one, optionally under 'state_dict' or 'model')")
    return sd


def _fmt_keys(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights_file(model, path: Path, anchor: AnchorCfg, *, optional: frozenset = frozenset(),
                      problems=None) -> None:
    """Load a user's weights file into ``model`` strictly: missing / unexpected keys and shape mismatches are one
    line naming the anchor and the file (``num_batches_tracked`` counters and the keys in ``optional`` may be
    absent; ``problems(sd)``: more reasons, as strings, why the file does not fit)."""
    sd = read_state_dict(path, anchor.name)
    mine = model.state_dict()
    missing = [k for k in mine if k not in sd and not k.endswith("num_batches_tracked") and k not in optional]
    unexpected = [k for k in sd if k not in mine]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file vs {tuple(mine[k].shape)}" for k in sd
              if k in mine and tuple(sd[k].shape) != tuple(mine[k].shape)]
    other = problems(sd) if problems is not None and not shapes else []
    if missing or unexpected or shapes or other:
        parts = ([f"{len(missing)} missing keys ({_fmt_keys(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({_fmt_keys(unexpected)})"] if unexpected else []) + \
                ([f"{len(shapes)} shape mismatches ({_fmt_keys(shapes, 2)})"] if shapes else []) + other
        raise KlasError(f"{path}: weights do not fit anchor {anchor.name!r} ({anchor.arch} with "
                        f"{anchor.model_args or 'default args'}): {'; '.join(parts)}")
    model.load_state_dict(sd, strict=False)


def _hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be reached (None when it can): ``HF_HUB_OFFLINE`` set, or no connection to
    its host within 3 s -- then hub downloads are switched to offline mode for this process, so a missing file is
    one error at once instead of a minute of retries (huggingface_hub retries each request several times)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
        return None
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub: set the live value too
    except ImportError:
        pass
    return f"no network: {host}:{port} is unreachable"


def _build_model(anchor: AnchorCfg, pretrained: bool = False, **kwargs):
    """``timm.create_model`` with one-line errors naming the anchor (unknown architecture, bad arguments, hub)."""
    import timm

    if not timm.is_model(anchor.arch):
        import difflib
        close = difflib.get_close_matches(anchor.arch, timm.list_models(), n=3)
        raise KlasError(f"anchor {anchor.name!r}: unknown timm architecture {anchor.arch!r}"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    offline = pretrained and "file" not in (kwargs.get("pretrained_cfg_overlay") or {}) and _hub_offline()
    try:
        return timm.create_model(anchor.arch, pretrained=pretrained, **kwargs)
    except KlasError:
        raise
    except Exception as e:  # noqa: BLE001
        lines = [x for x in str(e).splitlines() if x.strip()]
        what = "cannot fetch its pretrained weights" if pretrained else "cannot build it"
        if offline:
            what += f" ({offline}; only weights already in the Hugging Face cache load)"
        raise KlasError(f"anchor {anchor.name!r} ({anchor.arch}, {anchor.model_args or 'default args'}): {what} "
                        f"({type(e).__name__}: {(lines[0] if lines else '')[:200]})") from None


def create_anchor(anchor: AnchorCfg, input_shape, pretrained: bool = False, weights=None,
                  num_classes: int | None = None) -> BlockView:
    """Build one anchor with timm; ``pretrained`` loads hub weights, or a local file when one is given."""
    kwargs = dict(anchor.model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    local = _weights_for(anchor, weights) if (pretrained or weights is not None) else None
    if local is not None and anchor.weights and str(local) == anchor.weights:
        # a family from the config: the user's own file, loaded strictly into the architecture they named
        model = _build_model(anchor, **kwargs)
        load_weights_file(model, local, anchor)
    elif local is not None:
        if not local.is_file():
            raise KlasError(f"{local}: weights file not found for anchor {anchor.name!r}")
        # timm's own loader, pointed at a local file: it applies the family's checkpoint filter (pos-embed
        # resizing, classifier adaptation), exactly as for hub weights.
        overlay = dict(file=str(local))
        if anchor.embedded_file or _trained_here(local, anchor):
            # klas-trained files carry the family's own classifier: tell timm so it keeps it (not a 1000-class head,
            # which timm's filter would drop, leaving a random one)
            overlay.update(num_classes=anchor.model_args.get("num_classes"), input_size=tuple(input_shape))
        model = _build_model(anchor, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    elif pretrained and is_hub_id(anchor.weights):
        w = anchor.weights
        if w.startswith("hf-hub:"):
            model = _build_model(anchor, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=w[len("hf-hub:"):]),
                                 **kwargs)
        else:
            tag = w.split(":", 1)[1] if ":" in w else None
            model = _build_model(AnchorCfg(anchor.name, f"{anchor.arch}.{tag}" if tag else anchor.arch,
                                           anchor.model_args), pretrained=True, **kwargs)
    else:
        model = _build_model(anchor, pretrained=pretrained, **kwargs)
    model.eval()
    view = block_view(model, anchor.name, input_shape)
    view.weights_file = local  # the file the user's weights came from (None: hub or random): exported as given
    return view


def _trained_here(path: Path, anchor: AnchorCfg) -> bool:
    """Whether ``path`` is a file klas's anchor trainer wrote for ``anchor`` (its safetensors metadata says so)."""
    from klas.io import tensor_metadata

    return (tensor_metadata(path) or {}).get("anchor") == anchor.name


def check_stitchable(name: str, views: list[BlockView], source: str = "") -> None:
    """Anchors of one family need at least one stitchable pair (one-line error): blocks of the same output shape, or
    grids of different layouts (a CNN's maps and a transformer's tokens, ``cross_layout``)."""
    where = f"{source}: " if source else ""
    if len(views) < 2:
        return
    from klas.families.blockview import stitchable
    for a in views:
        for b in views:
            if a is not b and any(stitchable(a, i, b, j) for i in range(a.depth) for j in range(b.depth)):
                return
    shapes = "; ".join(f"{v.name}: {sorted({tuple(v.spatial(i)) for i in range(v.depth)})}" for v in views)
    raise KlasError(f"{where}family {name}: no two anchors have blocks with the same output resolution (or grids of "
                    f"different layouts within a factor 4), so nothing can be stitched ({shapes})")


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
    from klas.tasks import task_of

    task = task_of(cfg)  # the task builds its kind of anchor (timm classifiers, Hugging Face decoders, ...)
    views = [task.build_anchor(a, shape, pretrained=pretrained, weights=weights, num_classes=num_classes)
             for a in chosen]
    if cfg.source:  # a family from a config: say now, in one line, when its anchors cannot form a family
        task.check_family(cfg, views, cfg.source)
    views.sort(key=lambda v: v.flops)
    return Family(cfg, views)


