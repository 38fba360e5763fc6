"""Stitched networks of a finetuned run: the configurations over shared anchor modules, the standalone networks of
the ``independent`` / ``frozen`` recipes, and the loaders that rebuild either from the finetune stage's folder.

``StitchedModels`` holds the anchors once and one stitch layer per stitched configuration; ``forward(x, k)`` runs
configuration k. Trained by the ``shared`` recipe it is SN-Net's supernetwork; it is also the container the
evaluation and export stages read every recipe through. ``StandaloneStitches`` has its interface but builds stitch
k's own network (copies of its anchors, its stitch layer and LoRA adapters, its trained tensors) on each call.
"""
from __future__ import annotations

import copy
import itertools
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from klas.errors import KlasError
from klas.families import Family, create_family, stitchable
from klas.io import load_tensors
from klas.rundir import RunDir
from klas.stitch import LoRALinear, StitchConfig, StitchedNet, StitchLayer, add_lora, make_stitch_layer, merge_lora

# the finetune stage's files, in its folder <run>/finetune
RECORD, ANCHORS, STITCHES, INIT_STITCHES = ("finetune.json", "anchors.safetensors", "stitch_layers.safetensors",
                                            "init_stitch_layers.safetensors")
SUPERNET_CKPT = "supernet.ckpt"  # the shared recipe's training state
CONFIG_DIR, CKPT_DIR = "configs", "checkpoints"  # independent / frozen: per-configuration weights and checkpoints


def read_selection(sel, family: Family, path: Path | str | None = None) -> list[StitchConfig]:
    """The configurations a selection asks for (its ``SelectionArtifact``, the same record as a dict, or the path of
    a selection.json): its anchors (as whole networks), then its selected stitches, validated against the family
    (anchor names, block ranges, stitchable shapes, direction small -> large); errors name ``path``."""
    if isinstance(sel, (str, Path)):
        from klas.io import load_json

        path, sel = Path(sel), load_json(sel)
    sel = sel if isinstance(sel, dict) or not hasattr(sel, "__dataclass_fields__") else asdict(sel)
    if not isinstance(sel, dict) or not isinstance(sel.get("selected"), list):
        raise KlasError(f"{path}: expected a selection object with a 'selected' list (run `klas select` first)")
    if sel.get("family") not in (None, family.name):
        raise KlasError(f"{path}: selection is for family {sel.get('family')!r}, not {family.name!r}")
    names = [a.name for a in family]
    anchors = sel.get("anchors") or []
    if not isinstance(anchors, list) or any(a not in names for a in anchors):
        raise KlasError(f"{path}: 'anchors' must list anchors of {family.name} ({', '.join(names)}); got {anchors!r}")
    configs = [StitchConfig.anchor(a) for a in sorted(set(anchors), key=names.index)]
    for k, entry in enumerate(sel["selected"]):
        where = f"{path}: selected[{k}]"
        if isinstance(entry, dict) and entry.get("direction") in ("reverse", "round-trip"):
            # NOTE: selection.directions = two-way; scripts/two_way_study.py finetunes and compares those paths
            raise KlasError(f"{where}: {entry.get('key')} is a two-way path (SN-Netv2); the finetune stage trains "
                            f"forward stitches only: select with selection.directions = forward")
        cfg = StitchConfig.from_dict(entry if isinstance(entry, dict) else {}, where)
        for name in (cfg.source, cfg.target):
            if name not in names:
                raise KlasError(f"{where}: unknown anchor {name!r}; family {family.name} has {', '.join(names)}")
        src, tgt = family[cfg.source], family[cfg.target]
        if cfg.is_anchor:
            configs.append(cfg)
            continue
        if not (0 <= cfg.i < src.depth and 0 <= cfg.j < tgt.depth):
            raise KlasError(f"{where}: i={cfg.i} must lie in [0, {src.depth - 1}] and j={cfg.j} in "
                            f"[0, {tgt.depth - 1}] (i = last source block kept, j = target block replaced)")
        if src.flops >= tgt.flops:
            raise KlasError(f"{where}: stitches go from a smaller to a larger anchor; {cfg.source} -> {cfg.target} "
                            f"is not")
        if not stitchable(src, cfg.i, tgt, cfg.j):
            raise KlasError(f"{where}: block {cfg.i} of {cfg.source} and block {cfg.j} of {cfg.target} have "
                            f"different token/spatial shapes; not stitchable")
        configs.append(cfg)
    out = list(dict.fromkeys(configs))  # drop duplicates, keep order
    if not out:
        raise KlasError(f"{path}: no anchors and no selected stitches: nothing to finetune")
    return out


def limit_stitches(configs: list[StitchConfig], n: int | None, family: Family) -> list[StitchConfig]:
    """The anchors of ``configs`` plus at most ``n`` of its stitches, spread evenly over their FLOPs among those in
    the middle 70 % of their anchor pair's FLOPs gap (all of them when fewer than ``n`` are; order of the selection
    kept). ``n`` None, or no more stitches than ``n``: unchanged."""
    from klas.families import stitched_flops

    stitched = [c for c in configs if not c.is_anchor]
    if n is None or len(stitched) <= n:
        return list(configs)

    def position(c: StitchConfig) -> float:  # 0 at the source anchor's FLOPs, 1 at the target's
        lo, hi = family[c.source].flops, family[c.target].flops
        return (stitched_flops(family[c.source], c.i, family[c.target], c.j) - lo) / max(hi - lo, 1)

    # NOTE: a stitch costing about what one of its anchors costs can only tie it; gains sit inside the gaps
    middle = [c for c in stitched if 0.15 <= position(c) <= 0.85]
    stitched = middle if len(middle) >= n else stitched
    ranked = sorted(stitched, key=lambda c: (stitched_flops(family[c.source], c.i, family[c.target], c.j), c.key))
    keep = {ranked[round(m * (len(ranked) - 1) / max(n - 1, 1))] for m in range(n)}
    return [c for c in configs if c.is_anchor or c in keep]


# --- finetuning ---------------------------------------------------------------------------------------------------

def _mkey(name: str) -> str:
    return name.replace(".", "_")


class StitchedModels(nn.Module):
    """Anchors (shared weights) plus one stitch layer per stitched configuration; ``forward(x, k)`` runs config k
    (the ``shared`` recipe trains it as one supernetwork)."""

    def __init__(self, family: Family, configs: list[StitchConfig], subset: list[int] | None = None):
        super().__init__()
        self.configs = list(configs)
        self.indices = list(range(len(configs))) if subset is None else sorted(subset)
        used = {n for k in self.indices for n in (configs[k].source, configs[k].target)}
        self.family_name = family.name
        self.anchors = nn.ModuleDict({_mkey(v.name): v for v in family if v.name in used})
        stitches = {}
        for k in self.indices:
            c = self.configs[k]
            if not c.is_anchor:
                src, tgt = self.view(c.source), self.view(c.target)
                stitches[str(k)] = make_stitch_layer(src, c.i, tgt, c.j)
        self.stitches = nn.ModuleDict(stitches)
        # NOTE: a plain dict (not registered): the nets reuse the modules above, registered once.
        self._nets = {k: self._build(k) for k in self.indices}

    def view(self, name: str):
        return self.anchors[_mkey(name)]

    def _build(self, k: int) -> StitchedNet:
        c = self.configs[k]
        if c.is_anchor:
            return StitchedNet(self.view(c.source), -1, self.view(c.source), -1, None)
        return StitchedNet(self.view(c.source), c.i, self.view(c.target), c.j, self.stitches[str(k)])

    def train(self, mode: bool = True) -> "StitchedModels":
        super().train(mode)
        for n in self._nets.values():  # the wrappers are not registered children: keep their flag in step
            n.training = mode
        return self

    def net(self, k: int) -> StitchedNet:
        return self._nets[k]

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self._nets[k](x)

    def anchor_params(self, k: int) -> int:
        """Parameters of the anchors configuration ``k`` runs (what its own trainable copy holds)."""
        c = self.configs[k]
        return sum(p.numel() for n in {c.source, c.target} for p in self.view(n).parameters())

    def anchor_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{v.name}/{key}": t for v in self.anchors.values() for key, t in v.model.state_dict().items()}

    def stitch_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}/{key}": t for k, layer in self.stitches.items() for key, t in layer.state_dict().items()}

    def load_anchor_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for v in self.anchors.values():
            sd = {key[len(v.name) + 1:]: t for key, t in tensors.items() if key.startswith(v.name + "/")}
            _load(v.model, sd, f"{where} [{v.name}]")

    def load_stitch_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for k, layer in self.stitches.items():
            _load(layer, {key[len(k) + 1:]: t for key, t in tensors.items() if key.startswith(k + "/")},
                  f"{where} [stitch {k}: {self.configs[int(k)].key}]")


def _load(module: nn.Module, sd: dict, where: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise KlasError(f"{where}: weights do not match ({str(e).splitlines()[0][:160]})") from None


def trainable_stitch(src: nn.Module, tgt: nn.Module, config: StitchConfig, layer: StitchLayer, recipe: str,
                     lora_rank: int = 4, lora_alpha: float = 8.0, generator: torch.Generator | None = None
                     ) -> StitchedNet:
    """The standalone network one stitch of the ``independent`` / ``frozen`` recipe trains: deep copies of the two
    anchor views ``src``, ``tgt`` (the originals are never touched) and of ``layer``. ``frozen``: every anchor weight
    is frozen and LoRA adapters wrap the target's attention and MLP Linear layers after the stitch (none in conv
    blocks: there only the stitch layer trains)."""
    if recipe not in ("independent", "frozen"):
        raise ValueError(f"recipe {recipe!r}: expected independent or frozen")
    src_c, tgt_c = copy.deepcopy(src), copy.deepcopy(tgt)
    net = StitchedNet(src_c, config.i, tgt_c, config.j, copy.deepcopy(layer))
    if recipe == "frozen":
        for p in itertools.chain(src_c.parameters(), tgt_c.parameters()):
            p.requires_grad_(False)
        add_lora(tgt_c, config.j + 1, lora_rank, lora_alpha, generator)
    return net


def set_train_mode(net: StitchedNet, recipe: str) -> None:
    """Training mode for one recipe's stitched network: everything (independent), or only the stitch layer and the
    adapters (frozen: the anchors stay in eval mode, so dropout, drop-path and norm statistics are the pretrained
    ones and nothing but the adapters and the stitch layer changes)."""
    if recipe == "independent":
        net.train()
        return
    net.eval()
    net.layer.train()
    for m in net.modules():
        if isinstance(m, LoRALinear):
            m.train()


def _used_names(net: nn.Module, input_shape: tuple[int, ...] | torch.Tensor) -> set[str]:
    """Names of the parameters one forward pass of ``net`` reaches (autograd), like ``klas.stitch.used_parameters``."""
    params = dict(net.named_parameters())
    saved = {n: (p.grad, p.requires_grad) for n, p in params.items()}
    was = net.training
    try:
        net.eval()
        for p in params.values():
            p.grad = None
            p.requires_grad_(True)
        x = input_shape if isinstance(input_shape, torch.Tensor) else \
            torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))  # or an input batch (token ids)
        net(x).float().square().sum().backward()
        return {n for n, p in params.items() if p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad, rg = saved[n]
            p.requires_grad_(rg)
        net.train(was)


def stitch_tensors_to_save(net: StitchedNet, recipe: str) -> dict[str, torch.Tensor]:
    """What a trained stitch of the ``independent`` / ``frozen`` recipe stores (state-dict keys of its
    ``StitchedNet``): independent -- every parameter its forward uses (source stem and blocks 0..i, stitch layer,
    target blocks j+1.. and head) and every buffer of the two copies; frozen -- the stitch layer and the LoRA
    factors only (the rest is the untouched anchors)."""
    sd = net.state_dict()
    if recipe == "frozen":
        keep = {n for n, p in net.named_parameters() if p.requires_grad}
    else:
        keep = _used_names(net, net.src.example_input(2)) | {n for n, _ in net.named_buffers()}
    return {k: v.detach().clone() for k, v in sd.items() if k in keep}


class StandaloneStitches(StitchedModels):
    """The trained configurations of an ``independent`` / ``frozen`` run, with ``StitchedModels``' interface
    (``configs``, ``indices``, ``view``, ``net(k)``): the anchors are the untouched ones (an anchor configuration is
    the untouched anchor), and ``net(k)`` of a stitched configuration builds its standalone network -- copies of the
    anchors it uses, its stitch layer (and LoRA adapters), its trained tensors from ``files[k]`` -- on each call, so
    that no more than one stitched network's copies are held at a time. ``merge``: fold LoRA adapters into plain
    Linear layers (the deployable form: same function up to float rounding, no extra latency)."""

    def __init__(self, family: Family, configs: list[StitchConfig], recipe: str, files: dict[int, Path],
                 subset: list[int] | None = None, lora_rank: int = 4, lora_alpha: float = 8.0, merge: bool = True):
        super().__init__(family, configs, subset)
        self.recipe, self.files, self.merge = recipe, dict(files), merge
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha

    def net(self, k: int) -> StitchedNet:
        c = self.configs[k]
        if c.is_anchor:
            return self._nets[k]
        if k not in self.indices:
            raise KeyError(k)
        net = trainable_stitch(self.view(c.source), self.view(c.target), c, self.stitches[str(k)], self.recipe,
                               self.lora_rank, self.lora_alpha)
        path = self.files[k]
        tensors = load_tensors(path)
        res = net.load_state_dict(tensors, strict=False)
        if res.unexpected_keys:
            raise KlasError(f"{path}: tensors {res.unexpected_keys[:3]} do not belong to {c.key} "
                            f"({self.recipe} recipe); rerun the finetune stage")
        missing = {n for n, p in net.named_parameters() if p.requires_grad} - set(tensors) \
            if self.recipe == "frozen" else {n for n in net.state_dict() if n.startswith("layer.")} - set(tensors)
        if missing:
            raise KlasError(f"{path}: lacks {sorted(missing)[:3]} of {c.key}; rerun the finetune stage")
        if self.merge:
            merge_lora(net)
        for p in net.parameters():
            p.requires_grad_(True)
        net.eval()
        return net

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.net(k)(x)


def remove_stale_stitch_files(out: Path, recipe: str, files: dict[int, str]) -> None:
    """In finetune folder ``out``: per-configuration files this run does not list (an earlier run's, with other
    settings), and the per-stitch checkpoints of a finished run."""
    if recipe == "shared":
        for d in (CONFIG_DIR, CKPT_DIR):
            shutil.rmtree(out / d, ignore_errors=True)
        return
    keep = {Path(f).name for f in files.values()}
    for f in (out / CONFIG_DIR).glob("*.safetensors"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    shutil.rmtree(out / CKPT_DIR, ignore_errors=True)


def _finetune_folder(run_dir: Path | str | RunDir) -> Path:
    return (run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)) / "finetune"


def finetune_record(run_dir: Path | str | RunDir):
    """The finetune stage's typed artifact (``FinetuneArtifact``) of a run, validated."""
    from klas.stages.s4_finetune import FinetuneArtifact  # the producer's record type

    return FinetuneArtifact.load(_finetune_folder(run_dir))


def load_stitched_models(run_dir: Path | str | RunDir, state: str = "final", anchors: list[str] | None = None,
                         family: Family | None = None, merge_lora: bool = True, record=None):
    """Rebuild the configurations of a finetuned run: ``state='final'`` (finetuned) or ``'init'`` (pretrained anchors
    and the stitch layers as initialised, before finetuning). ``anchors`` restricts it to configurations over those
    anchors. Returns (networks in eval mode, the ``FinetuneArtifact``): for the ``shared`` recipe the
    ``StitchedModels`` it trained; for ``independent`` / ``frozen`` (final) ``StandaloneStitches`` with the same
    interface (``indices``, ``net(k)``) whose anchor configurations are the untouched anchors and whose ``net(k)``
    builds stitch k's own network (``merge_lora``: LoRA adapters folded into the Linear layers). ``state='init'`` is
    the same for every recipe. ``record``: the run's ``FinetuneArtifact`` when the caller has read it already."""
    if state not in ("final", "init"):
        raise KlasError(f"state {state!r}: expected final or init")
    sdir = _finetune_folder(run_dir)
    art = record if record is not None else finetune_record(run_dir)
    where = sdir / RECORD
    configs = [StitchConfig.from_dict(r["config"], f"{where}: configs[{r['index']}]") for r in art.configs]
    keep = [k for k, c in enumerate(configs) if anchors is None or {c.source, c.target} <= set(anchors)]
    needed = sorted({n for k in keep for n in (configs[k].source, configs[k].target)})
    if family is None:
        if state == "init" and not art.pretrained:
            raise KlasError(f"{where}: this run's anchors were passed in, not built from the registry; pass the "
                            f"same family to rebuild its pre-finetuning state")
        kw = dict(num_classes=art.num_classes, input_shape=tuple(art.input_shape), anchors=needed)
        family = (create_family(art.family, **kw) if state == "final"
                  else create_family(art.family, pretrained=True, weights=art.weights, **kw))
    if state == "final" and art.recipe != "shared":
        rows = {r["index"]: r for r in art.configs}
        files = {k: sdir / rows[k]["weights"] for k in keep if rows[k].get("weights")}
        net = StandaloneStitches(family, configs, art.recipe, files, subset=keep,
                                 lora_rank=int(art.cfg.get("lora_rank", 4)),
                                 lora_alpha=float(art.cfg.get("lora_alpha", 8.0)), merge=merge_lora)
    else:
        net = StitchedModels(family, configs, subset=keep)
    if state == "final":
        net.load_anchor_tensors(load_tensors(sdir / ANCHORS), str(sdir / ANCHORS))
    stitches = sdir / (STITCHES if state == "final" else INIT_STITCHES)
    net.load_stitch_tensors(load_tensors(stitches), str(stitches))
    net.eval()
    return net, art


def load_stitched(run_dir: Path | str | RunDir, config: StitchConfig | dict | str, state: str = "final",
                  merge_lora: bool = True, record=None) -> StitchedNet:
    """One finetuned standalone stitched network of a run (eval mode), by StitchConfig, {source,i,target,j} or key.
    Only the one or two anchors it uses are built. Every recipe: shared (from the supernetwork), independent (the
    stitch's own anchor copies), frozen (untouched anchors + its stitch layer and LoRA adapters, merged into the
    Linear layers unless ``merge_lora`` is False); an anchor configuration of independent / frozen is the untouched
    anchor. ``record``: the run's ``FinetuneArtifact`` when the caller has read it already."""
    art = record if record is not None else finetune_record(run_dir)
    if isinstance(config, dict):
        config = StitchConfig.from_dict(config)
    keys = [r["key"] for r in art.configs]
    key = config if isinstance(config, str) else config.key
    if key not in keys:
        raise KlasError(f"{_finetune_folder(run_dir) / RECORD}: no configuration {key!r}; the run has: "
                        f"{', '.join(keys)}")
    c = StitchConfig.from_dict(art.configs[keys.index(key)]["config"])
    net, _ = load_stitched_models(run_dir, state, anchors=sorted({c.source, c.target}), merge_lora=merge_lora,
                                  record=art)
    return net.net(keys.index(key))
