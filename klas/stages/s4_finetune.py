"""Finetuning of the selected stitches, by one of three recipes (``FinetuneConfig.recipe``):

* ``shared`` -- the stitched supernetwork (SN-Net, Pan et al., CVPR 2023): anchors shared by every selected
  configuration, one stitch layer per stitched configuration, one (or ``configs_per_step``) sampled configuration(s)
  trained per step; the anchors' learning rate can be a fraction of the stitch layers' (``anchor_lr_scale``).
* ``independent`` -- every selected stitch finetunes its own copy of the two anchors it uses (from the least-squares
  stitch layer), for ``epochs x steps_per_epoch`` steps each; the anchor configurations stay the untouched anchors.
* ``frozen`` -- the anchors stay frozen; every stitch trains only its stitch layer and low-rank adapters
  (``klas.stitch.LoRALinear``) on the target's Linear layers after the stitch, so each stitched model adds a few
  weights to the untouched anchors.

Any recipe can add distillation from an untouched, frozen anchor's logits on the same batch (``distill``,
``distill_weight``, ``distill_temperature``). The anchors the family loaded are never trained by ``independent`` or
``frozen`` (deep copies are), nor used as teachers after training (teachers are copies made before it).

Determinism is by construction, so that a resumed run equals an uninterrupted one and every DDP rank agrees:

* the configuration of global step ``s`` is a pure function of (seed, s) (``config_at``); every rank computes the
  same one, so all ranks run the same sub-network and DDP reduces gradients of the same parameters;
* the data order of epoch ``e`` comes from a generator seeded by (seed, e); a resumed epoch replays its first
  batches without training on them (cheap: indexing + augmentation) to reach the same position;
* the learning rate is a closed form of the step (``klas.train.WarmupCosineLR``); weights, optimizer and schedule
  state, torch's global RNG and the history travel in the checkpoint (``klas.train.Trainer``).

The rest of this note is about ``shared``; ``independent`` / ``frozen`` train the stitches one after the other with
the same loop (data order, schedule, checkpoints), a checkpoint per stitch, and the finished stitch's weights in
``configs/<index>.safetensors``: a resumed run skips finished stitches and resumes the current one at its step.

DDP: each step runs one configuration, so most parameters (other stitch layers, skipped blocks, other anchors) get
no gradient; the model is wrapped with ``find_unused_parameters=True`` (the used set is identical on every rank
because the sampled configuration is). Only rank 0 writes files. ``accum_steps`` splits each rank's shard of a
step's global batch into micro-batches (no gradient sync until the last): a memory knob that leaves the result
unchanged. ``parallel="fsdp"`` wraps the supernetwork in torch's FSDP instead (large anchors; needs CUDA -- see
docs/scale-out.md). Collective failures (a dead or hung peer) end the job with a one-line KlasError.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from klas import distributed as kd
from klas.errors import KlasError
from klas.families import Family, create_family, stitchable
from klas.io import load_checkpoint, load_json, load_tensors, save_tensors
from klas.contract import Artifact, StageContext, digest, key_fields, setting
from klas.rundir import RunDir
from klas.stitch import FitCfg, LoRALinear, StitchConfig, StitchedNet, StitchLayer, add_lora, fit_stitch, merge_lora
from klas.train import Trainer, progress_bar

CKPT, ANCHORS, STITCHES, INIT_STITCHES, META = ("supernet.ckpt", "anchors.safetensors", "stitch_layers.safetensors",
                                                 "init_stitch_layers.safetensors", "supernet.json")
SAMPLING = ("balanced", "uniform")
PARALLEL = ("ddp", "fsdp")
RECIPES = ("shared", "independent", "frozen")
CONFIG_DIR, CKPT_DIR = "configs", "checkpoints"  # independent / frozen: per-configuration weights and checkpoints
DISTILL_SELECTORS = ("target", "largest")


@dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning of the selected stitches: ``recipe`` shared (one SN-Net supernetwork, anchors shared by every
    configuration), independent (each stitch its own copy of its two anchors) or frozen (anchors frozen; stitch
    layer + LoRA on the target blocks after the stitch).

    Budget: ``epochs`` x ``steps_per_epoch`` steps of ``batch_size`` images -- shared by all configurations in the
    ``shared`` recipe (x ``configs_per_step`` forward/backward passes per step), and *per stitch* in the
    ``independent`` and ``frozen`` ones; the artifact records the images seen in all (``images_seen``), the figure
    to hold equal when recipes are compared. ``sampling`` (shared): ``uniform`` draws a configuration per step
    i.i.d. (SN-Net); ``balanced`` walks seeded permutations of all configurations so each gets the same number of
    steps (+-1) under any budget -- fairer for short budgets. Under torchrun, ``accum_steps`` micro-batches per rank
    and step (same result, less memory) and ``parallel`` (ddp, or fsdp on CUDA) change memory and speed, not results.
    """

    recipe: str = setting("independent", "shared: one SN-Net supernetwork; independent: each stitch finetunes its own copy "
                          "of its anchors; frozen: anchors frozen, stitch layer + LoRA train", choices=RECIPES)
    epochs: int = setting(1, "training epochs", ge=1)
    steps_per_epoch: int | None = setting(None, "optimizer steps per epoch", ge=1, none="pass")
    batch_size: int = setting(128, "global images per step", ge=1)
    lr: float = setting(5e-4, "AdamW peak learning rate", gt=0)
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine decay", ge=0)
    weight_decay: float = setting(0.05, "AdamW weight decay (not on biases, norms, embeddings)", ge=0)
    warmup_frac: float = setting(0.05, "share of the budget spent in linear warm-up", ge=0, le=1)
    clip_grad: float = setting(1.0, "max gradient norm (0: off)", ge=0)
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy", ge=0, le=1)
    augment: bool = setting(True, "random shifts and flips of training images")
    train_subset: int | None = setting(None, "finetune on the first N train images", ge=1, none="all")
    val_images: int = setting(1000, "val images for the before/after accuracy of every configuration (0: off)",
                              ge=0)
    sampling: str = setting("balanced", "configuration per step (shared)", choices=SAMPLING)
    configs_per_step: int = setting(1, "configurations trained per step on the same batch, gradients summed (shared)",
                                    ge=1)
    anchor_lr_scale: float = setting(1.0, "anchors' learning rate as a fraction of the stitch layers' (shared, "
                                     "independent; 0 freezes them)", ge=0)
    max_stitches: int | None = setting(4, "finetune at most N of the selected stitches, spread over the middle of "
                                       "their anchor gaps", ge=1, none="all")
    distill: str | None = setting("target", "distil from an untouched anchor's logits: target (each configuration's "
                                  "target anchor), largest, or an anchor name", none="none")
    distill_weight: float = setting(0.5, "loss = (1 - w) cross-entropy + w T^2 KL(teacher || student)", ge=0, le=1)
    distill_temperature: float = setting(1.0, "softmax temperature T of the distillation term", gt=0)
    lora_rank: int = setting(4, "rank of the LoRA adapters (frozen)", ge=1)
    lora_alpha: float = setting(8.0, "LoRA scale alpha: the update is (alpha / rank) B A (frozen)", gt=0)
    amp: str = setting("auto", "bf16 autocast: auto = on CUDA only", choices=("auto", "bf16", "off"))
    ckpt_every: int = setting(0, "also checkpoint every K steps (0: at epoch ends only)", ge=0, key=False)
    accum_steps: int = setting(1, "micro-batches per rank and step (torchrun)", ge=1, key=False)
    parallel: str = setting("ddp", "data-parallel wrapper under torchrun", choices=PARALLEL, key=False)
    init: FitCfg = FitCfg()


@dataclass(frozen=True)
class FinetuneArtifact(Artifact):
    """``anchors.safetensors`` (shared: finetuned; independent / frozen: the untouched anchors) +
    ``stitch_layers.safetensors`` (finetuned), ``init_stitch_layers.safetensors`` (as initialised), for
    independent / frozen one ``configs/<index>.safetensors`` per stitched configuration (the tensors it trained), and
    this record: one row per configuration (key, config, flops, steps and images trained, teacher, weights file, val
    accuracy), the recipe and the images seen in all. The digest covers the per-configuration files too."""

    KIND: ClassVar[str] = "finetune"
    VERSION: ClassVar[int] = 2  # 2: recipes (recipe, images_seen, per-configuration weights)
    RECORD: ClassVar[str] = META
    FILES: ClassVar[tuple[str, ...]] = (ANCHORS, STITCHES, INIT_STITCHES)
    recipe: str
    images_seen: int
    family: str
    num_classes: int | None
    input_shape: list
    anchor_flops: dict
    selection: dict
    weights: str | None
    pretrained: bool
    dataset: str
    cfg: dict
    steps: int
    steps_per_epoch: int
    world_size: int
    wall_s: float
    history: list
    configs: list
    files: dict
    machine: dict

    @staticmethod
    def config_files(folder: Path | str) -> list[str]:
        """The per-configuration weight files a record in ``folder`` lists (none for ``shared`` or no record)."""
        try:
            rec = load_json(Path(folder) / META)
        except KlasError:
            return []
        rows = rec.get("configs") if isinstance(rec, dict) else None
        return sorted({r["weights"] for r in rows or [] if isinstance(r, dict) and isinstance(r.get("weights"), str)})

    @classmethod
    def load(cls, folder: Path | str) -> "FinetuneArtifact":
        art = super().load(folder)
        for f in cls.config_files(folder):
            if not (Path(folder) / f).is_file():
                raise KlasError(f"{Path(folder) / f}: missing; rerun the {cls.KIND} stage")
        return art

    @classmethod
    def digest(cls, folder: Path | str) -> str | None:
        base = super().digest(folder)
        extra = cls.config_files(folder) if base is not None else []
        if not extra:
            return base
        from klas.io import sha256_file

        h = hashlib.sha256(base.encode())
        for name in extra:
            p = Path(folder) / name
            if not p.is_file():
                return None
            h.update(name.encode() + b"\0" + sha256_file(p).encode())
        return h.hexdigest()[:16]


# --- selection input ----------------------------------------------------------------------------------------------

def read_selection(path: Path | str, family: Family) -> list[StitchConfig]:
    """The configurations a selection.json asks for: its anchors (as whole networks), then its selected stitches,
    validated against the family (anchor names, block ranges, stitchable shapes, direction small -> large)."""
    path = Path(path)
    sel = load_json(path)
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


# --- distillation -------------------------------------------------------------------------------------------------

def teacher_name(config: StitchConfig, cfg: FinetuneConfig, family: Family) -> str | None:
    """The anchor whose untouched logits ``config`` is distilled from (None: no distillation)."""
    if cfg.distill is None:
        return None
    if cfg.distill == "target":
        return config.target
    if cfg.distill == "largest":
        return max(family, key=lambda v: v.flops).name
    return cfg.distill


def _check_distill(cfg: FinetuneConfig, family: Family) -> None:
    names = [v.name for v in family]
    if cfg.distill is not None and cfg.distill not in DISTILL_SELECTORS and cfg.distill not in names:
        raise KlasError(f"--distill {cfg.distill!r}: expected none, target, largest or an anchor of {family.name} "
                        f"({', '.join(names)})")


def _teachers(family: Family, names: set[str], device: torch.device) -> dict[str, nn.Module]:
    """Frozen, eval-mode deep copies of the named anchors, made before anything trains: the teachers stay the
    untouched pretrained anchors even where the ``shared`` recipe trains the family's own in place."""
    out = {}
    for n in sorted(names):
        t = copy.deepcopy(family[n]).eval().to(device)
        for p in t.parameters():
            p.requires_grad_(False)
        out[n] = t
    return out


def distill_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                 cfg: FinetuneConfig) -> torch.Tensor:
    """The training loss of one batch: label-smoothed cross-entropy, or with a teacher
    ``(1 - w) CE + w T^2 KL(softmax(t / T) || softmax(s / T))`` (batch mean; w = ``distill_weight``, T =
    ``distill_temperature``; the T^2 keeps the gradient scale independent of T, Hinton et al. 2015)."""
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    t = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - cfg.distill_weight) * ce + cfg.distill_weight * kl


# --- the supernetwork ---------------------------------------------------------------------------------------------

def _mkey(name: str) -> str:
    return name.replace(".", "_")


class Supernet(nn.Module):
    """Anchors (shared weights) plus one stitch layer per stitched configuration; ``forward(x, k)`` runs config k."""

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
                stitches[str(k)] = StitchLayer(src.feature_dim(c.i), tgt.feature_dim(c.j), src.channels_last)
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

    def train(self, mode: bool = True) -> "Supernet":
        super().train(mode)
        for n in self._nets.values():  # the wrappers are not registered children: keep their flag in step
            n.training = mode
        return self

    def net(self, k: int) -> StitchedNet:
        return self._nets[k]

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self._nets[k](x)

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


# --- the independent and frozen recipes: one standalone network per stitch ------------------------------------------

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


def _used_names(net: nn.Module, input_shape: tuple[int, ...]) -> set[str]:
    """Names of the parameters one forward pass of ``net`` reaches (autograd), like ``klas.stitch.used_parameters``."""
    params = dict(net.named_parameters())
    saved = {n: (p.grad, p.requires_grad) for n, p in params.items()}
    was = net.training
    try:
        net.eval()
        for p in params.values():
            p.grad = None
            p.requires_grad_(True)
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
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
        keep = _used_names(net, net.src.input_shape) | {n for n, _ in net.named_buffers()}
    return {k: v.detach().clone() for k, v in sd.items() if k in keep}


class StitchSet(Supernet):
    """The trained configurations of an ``independent`` / ``frozen`` run, with ``Supernet``'s interface
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


# --- deterministic schedule ---------------------------------------------------------------------------------------

def _derive(seed: int, *tags) -> int:
    """A 63-bit seed derived from the run seed and tags: independent streams without arithmetic seed collisions."""
    h = hashlib.sha256(json.dumps([seed, *tags]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def config_at(step: int, n_configs: int, seed: int, sampling: str = "balanced") -> int:
    """Index of the configuration trained at global step ``step``; the same on every rank and after any resume."""
    if sampling == "uniform":
        g = torch.Generator().manual_seed(_derive(seed, "uniform", step))
        return int(torch.randint(n_configs, (1,), generator=g))
    block, pos = divmod(step, n_configs)
    g = torch.Generator().manual_seed(_derive(seed, "balanced", block))
    return int(torch.randperm(n_configs, generator=g)[pos])


def _stream(data, cfg: FinetuneConfig, seed: int, epoch: int, rank: int, world: int):
    """Training batches of epoch ``epoch``: seeded passes over the data, repeated as needed, rank-sharded."""
    from klas.data import batches

    gen = torch.Generator().manual_seed(_derive(seed, "data", epoch))
    while True:
        yield from batches(data, cfg.batch_size, shuffle=True, gen=gen, train_augment=cfg.augment, drop_last=True,
                           rank=rank, world_size=world)


def _rest_of_epoch(step: int, spe: int, train, cfg: FinetuneConfig, seed: int, rank: int, world: int, device):
    """The training batches from global ``step`` to the end of its epoch, on ``device``: a resumed epoch replays its
    seeded data order up to the step it stopped at (cheap: indexing + augmentation) and goes on from there."""
    epoch, pos = divmod(step, spe)
    stream = itertools.islice(_stream(train, cfg, seed, epoch, rank, world), pos, None)
    for _ in range(pos, spe):
        x, y = next(stream)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# --- distributed --------------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (WORLD_SIZE > 1) when nobody has yet."""
    di = kd.init()
    return di.rank, di.world


def _barrier(world: int) -> None:
    if world > 1:
        kd.barrier("supernet checkpoint barrier")


def _wrap(net: Supernet, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """The data-parallel wrapper: DDP (find_unused_parameters: each step trains one configuration) or FSDP."""
    if cfg.parallel == "fsdp":
        if device.type != "cuda":
            raise KlasError("--parallel fsdp: torch's FSDP needs CUDA devices; use --parallel ddp on the CPU")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # NOTE: one root unit with original parameters, so the supernet's per-config forward (which reuses the
        # anchors' submodules) keeps working; every rank runs the same configuration, so all-gathers line up.
        return FSDP(net, device_id=device, use_orig_params=True, sync_module_states=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


# --- finetuning ---------------------------------------------------------------------------------------------------

def _resume_tag(family: str, weights, configs: list[StitchConfig], cfg, seed: int) -> str:
    """What a checkpoint was made for (settings that change results, configurations, seed): a relaunch with other
    settings never resumes it. Whether the stage is *done* is the pipeline's decision, not this."""
    return digest(family, str(weights), [c.key for c in configs], key_fields(cfg), seed)


@torch.no_grad()
def config_accuracy(net: nn.Module, data, batch_size: int = 500, device: torch.device | None = None,
                    sharded: bool = False) -> float:
    """Top-1 accuracy (percent) of one network on an ImageSet. ``sharded``: under torchrun each rank counts its
    shard of every batch and the counts are summed (every rank gets the whole-split figure; exact: integers)."""
    from klas.data import batches

    di = kd.info() if sharded else kd.DistInfo()
    was = net.training
    net.eval()
    correct = 0
    for x, y in batches(data, batch_size, rank=di.rank, world_size=di.world):
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += (net(x).argmax(-1) == y).sum().item()
    net.train(was)
    correct = kd.all_reduce_int(correct, "accuracy counts") if di.distributed else correct
    return 100.0 * correct / max(len(data), 1)


def _machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def _build_family(family: str | Family, weights) -> Family:
    if isinstance(family, Family):
        return family
    return create_family(family, pretrained=True, weights=weights)


def _init_layers(net: Supernet, train, cfg: FinetuneConfig, seed: int, path: Path, fp: str, rank: int,
                 progress: bool) -> dict[int, dict]:
    """Fit every stitch layer (or reload the fit made before an interruption); returns per-config fit statistics."""
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("resume_tag") == fp:
            net.load_stitch_tensors(load_tensors(path), str(path))
            return {int(k): v for k, v in json.loads(meta["stats"]).items()}
    stats: dict[int, dict] = {}
    todo = [k for k, c in enumerate(net.configs) if not c.is_anchor]
    for k in tqdm(todo, desc=f"[supernet] init stitch layers ({cfg.init.method})", disable=not progress or rank != 0):
        c = net.configs[k]
        fit = replace(cfg.init, seed=_derive(seed, "init", k) & 0xFFFFFFFF)
        layer, st = fit_stitch(net.view(c.source), c.i, net.view(c.target), c.j, train, fit)
        net.stitches[str(k)].load_state_dict(layer.state_dict())
        stats[k] = st
    if rank == 0:
        save_tensors(net.stitch_tensors(), path, metadata=dict(resume_tag=fp, stats=json.dumps(stats)))
    return stats


def finetune_supernet(run_dir: Path | str | RunDir, cfg: FinetuneConfig, *, seed: int,
                      selection_path: Path | str | None = None, family: str | Family | None = None, weights=None,
                      data_root: Path | str | None = None, dataset: str | None = None, progress: bool = True,
                      restart: bool = False, on_step=None, data=None) -> FinetuneArtifact:
    """Initialise the stitch layers and finetune the selected configurations by ``cfg.recipe``; resumable,
    DDP-ready.

    Writes ``run_dir/finetune/``: ``init_stitch_layers.safetensors`` (stitch layers before finetuning),
    ``stitch_layers.safetensors`` (finetuned) and ``anchors.safetensors`` (shared: the finetuned anchors;
    independent / frozen: the untouched ones), ``supernet.json`` (the artifact record) and ``training.png``; shared:
    ``supernet.ckpt`` (training state: every epoch and every ``cfg.ckpt_every`` steps); independent / frozen:
    ``configs/<index>.safetensors`` (each stitch's trained tensors, written when it finishes) and
    ``checkpoints/<index>.ckpt`` (the stitch in training, at the same cadence; removed when it finishes).

    Args:
        selection_path: a selection.json (default: ``run_dir/selection/selection.json``).
        family: a family name or an already built Family (shared: trained in place; independent / frozen: never
            modified); default: the run's family.
        weights: anchor weights for ``create_family`` (default: the family's pretrained/shipped weights).
        restart: discard checkpoints (and finished stitches) made with other settings instead of refusing to touch
            them (those made with these settings are always resumed).
        on_step: called with the global step after each optimizer step (a test hook: raising there simulates a
            crash between checkpoints); independent / frozen count steps over the stitches in training order.
    """
    from klas.data import open_split

    rank, world = _dist()
    run = run_dir if isinstance(run_dir, RunDir) else None
    sel_path = Path(selection_path) if selection_path is not None else Path(run_dir if run is None else run.path) \
        / "selection" / "selection.json"
    if not sel_path.is_file():
        raise KlasError(f"{sel_path}: selection file not found (run the selection stage first)")
    fam_name = family.name if isinstance(family, Family) else family
    if fam_name is None:
        fam_name = load_json(sel_path).get("family")
    if run is None:
        run = RunDir(run_dir, fam_name)
    fam_name = fam_name or run.family
    out = run.stage("finetune")
    fam = _build_family(family if family is not None else fam_name, weights)
    configs = limit_stitches(read_selection(sel_path, fam), cfg.max_stitches, fam)
    _check_distill(cfg, fam)
    fp = _resume_tag(fam.name, weights, configs, cfg, seed)

    dataset = dataset or run.meta.get("dataset") or fam.cfg.dataset
    train = open_split(fam, "train", data, root=data_root, dataset=dataset, augment=cfg.augment
                       ).subset(cfg.train_subset)
    val = open_split(fam, "val", data, root=data_root, dataset=dataset).subset(cfg.val_images) \
        if cfg.val_images else None
    spe = cfg.steps_per_epoch or (len(train) // cfg.batch_size)
    if spe < 1:
        raise KlasError(f"--batch-size {cfg.batch_size}: larger than the training set ({len(train)} images)")
    kd.check_divisible(cfg.batch_size, world)
    total = cfg.epochs * spe

    device = kd.info().device
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    trained = [k for k, c in enumerate(configs) if cfg.recipe == "shared" or not c.is_anchor]
    teacher_of = {k: teacher_name(configs[k], cfg, fam) for k in trained}
    # NOTE: copies of the untouched anchors, made before anything trains (shared trains the family's in place)
    teachers = _teachers(fam, {t for t in teacher_of.values() if t is not None}, device)
    torch.manual_seed(seed)
    net = Supernet(fam, configs)
    init_stats = _init_layers(net, train, cfg, seed, out / INIT_STITCHES,
                              _resume_tag(fam.name, weights, configs, cfg.init, seed), rank, progress)
    env = dict(cfg=cfg, seed=seed, train=train, val=val, spe=spe, total=total, out=out, fp=fp, rank=rank,
               world=world, device=device, use_amp=use_amp, progress=progress, restart=restart, on_step=on_step,
               teachers={k: teachers[t] if t is not None else None for k, t in teacher_of.items()})
    if cfg.recipe == "shared":
        state, val_final = _train_shared(net, env)
        weight_files = {}
    else:
        state, val_final, weight_files = _train_each(net, env)
    ctx = dict(weights=None if weights is None else str(weights), pretrained=not isinstance(family, Family),
               dataset=dataset, cfg=dict(asdict(cfg), seed=seed), steps=total, steps_per_epoch=spe, world_size=world)
    art = FinetuneArtifact(**_summary(net, fam, sel_path, ctx, state, init_stats, val_final, cfg, teacher_of,
                                      weight_files))
    if rank == 0:
        save_tensors(net.anchor_tensors(), out / ANCHORS, metadata=dict(family=fam.name, recipe=cfg.recipe))
        save_tensors(net.stitch_tensors(), out / STITCHES, metadata=dict(family=fam.name, recipe=cfg.recipe))
        art.save(out)
        _plot_training(state["losses"], out / "training.png", state.get("curves"))
        _remove_stale(out, cfg.recipe, weight_files)
    _barrier(world)
    return art


def _train_shared(net: Supernet, env: dict) -> tuple[dict, list | None]:
    """The SN-Net loop: ``configs_per_step`` sampled configurations per step (each on the step's batch, gradients
    summed), the shared anchors at ``anchor_lr_scale`` x the stitch layers' learning rate. Returns (state, val
    accuracy of every configuration after training)."""
    cfg, seed, train, val, spe, total, out, fp = (env[k] for k in ("cfg", "seed", "train", "val", "spe", "total",
                                                                  "out", "fp"))
    rank, world, device, use_amp, progress = (env[k] for k in ("rank", "world", "device", "use_amp", "progress"))
    teachers, on_step, n, per = env["teachers"], env["on_step"], len(net.configs), cfg.configs_per_step
    ck = load_checkpoint(out / CKPT) if (out / CKPT).is_file() else None
    if ck is not None and not Trainer.matches(ck, fp) and env["restart"]:
        ck = None
    if ck is not None and not Trainer.matches(ck, fp):
        raise KlasError(f"{out / CKPT}: checkpoint was made with other settings, another selection or an older klas; "
                        f"delete it (or pass --restart) to start over")
    state = dict(history=[], losses=[], counts=[0] * n, wall_s=0.0, val_init=None)
    if val is not None and ck is None:
        state["val_init"] = [config_accuracy(net.net(k), val, sharded=True) for k in range(n)]
    net.to(device)
    # warm-up over warmup_frac of the budget, cosine to min_lr; no decay on biases, norms, embeddings
    scale = None if cfg.anchor_lr_scale == 1.0 else (
        lambda name: 1.0 if name.startswith("stitches.") else cfg.anchor_lr_scale)
    tr = Trainer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total,
                 warmup_steps=int(round(cfg.warmup_frac * total)), min_lr=cfg.min_lr, clip_grad=cfg.clip_grad,
                 no_decay=True, lr_scale=scale)
    if ck is not None:
        tr.load_state_dict(ck)
        state = ck["state"]
        if rank == 0 and progress:
            print(f"[supernet] resuming at step {tr.step}/{total}", flush=True)
    model = _wrap(net, cfg, device) if world > 1 else net

    def save_ckpt() -> None:
        if rank == 0:
            tr.save(out / CKPT, resume_tag=fp, state=state)
        _barrier(world)

    bar = progress_bar(total=total, initial=tr.step, desc=f"[supernet] finetune {n} configs",
                       enabled=progress, file=sys.stderr, leave=True)
    net.train()
    while tr.step < total:
        epoch = tr.step // spe
        t0 = time.perf_counter()
        for x, y in _rest_of_epoch(tr.step, spe, train, cfg, seed, rank, world, device):
            ks = [config_at(tr.step * per + m, n, seed, cfg.sampling) for m in range(per)]
            lr = tr.lr  # this step's learning rate (the history records the last one of each epoch)
            losses = [_accumulate(model, x, y, k, cfg, device.type, use_amp, world, teachers.get(k)) for k in ks]
            loss = losses[0] if per == 1 else torch.stack(losses).mean()
            tr.update()
            for k in ks:
                state["counts"][k] += 1
            state["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cfg=ks[0] if per == 1 else ",".join(map(str, ks)))
            if on_step is not None:
                on_step(tr.step)
            if cfg.ckpt_every and tr.step % cfg.ckpt_every == 0 and tr.step % spe:
                state["wall_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_ckpt()
        state["wall_s"] += time.perf_counter() - t0
        done = state["losses"][epoch * spe:]  # the whole epoch, also when it was resumed midway
        state["history"].append(dict(epoch=epoch + 1, step=tr.step, lr=lr, loss=sum(done) / len(done)))
        save_ckpt()
    bar.close()
    net.eval()
    val_final = ([config_accuracy(net.net(k), val, device=device, sharded=True) for k in range(n)] if val else None)
    net.cpu()
    return state, val_final


def _train_each(net: Supernet, env: dict) -> tuple[dict, list | None, dict[int, str]]:
    """The independent / frozen loop: every stitched configuration in selection order, each its own network
    (``trainable_stitch``: copies of the untouched anchors, its least-squares stitch layer) trained for the whole
    budget with the loop, schedule and data order of the shared recipe; its trained tensors go to
    ``configs/<k>.safetensors`` (with its history and val accuracy in the metadata) when it finishes, so a relaunch
    skips it. Anchor configurations are the untouched anchors. Returns (state, val accuracy per configuration,
    {k: weights file relative to the stage folder})."""
    cfg, val, out, fp, rank, world = (env[k] for k in ("cfg", "val", "out", "fp", "rank", "world"))
    n = len(net.configs)
    todo = [k for k, c in enumerate(net.configs) if not c.is_anchor]
    if rank == 0:
        (out / CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    _barrier(world)
    val_init = [config_accuracy(net.net(k), val, sharded=True) for k in range(n)] if val is not None else None
    bar = progress_bar(total=len(todo) * env["total"], desc=f"[{cfg.recipe}] finetune {len(todo)} stitches",
                       enabled=env["progress"], file=sys.stderr, leave=True)
    results, files = {}, {}
    for pos, k in enumerate(todo):
        rel = f"{CONFIG_DIR}/{k}.safetensors"
        files[k] = rel
        tag = digest(fp, "stitch", k)
        meta = _tensor_meta(out / rel)
        if meta is not None and meta.get("resume_tag") != tag:
            if not env["restart"]:
                raise KlasError(f"{out / rel}: made with other settings, another selection or an older klas; "
                                f"delete {out / CONFIG_DIR} (or pass --restart) to start over")
            meta = None
        if meta is not None:
            results[k] = json.loads(meta["state"])
            bar.update(env["total"])
            continue
        results[k] = _train_stitch(net, k, pos, tag, out / rel, env, bar)
    bar.close()
    # the trained stitch layers also go to stitch_layers.safetensors (the shared recipe's layout)
    for k in todo:
        layer = {key[len("layer."):]: t for key, t in load_tensors(out / files[k]).items() if key.startswith("layer.")}
        net.stitches[str(k)].load_state_dict(layer)
    counts = [0] * n
    for k in todo:
        counts[k] = results[k]["steps"]
    state = dict(counts=counts, val_init=val_init, wall_s=sum(results[k]["wall_s"] for k in todo),
                 history=[dict(config=k, **h) for k in todo for h in results[k]["history"]],
                 losses=[v for k in todo for v in results[k]["losses"]],
                 curves={net.configs[k].key: results[k]["losses"] for k in todo})
    val_final = None
    if val is not None:
        val_final = [results[k]["val_acc"] if k in results else val_init[k] for k in range(n)]
    return state, val_final, files


def _tensor_meta(path: Path) -> dict | None:
    """The metadata of a safetensors file (None when it is missing or unreadable)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 -- a torn or foreign file: train the stitch again
        return None


def _train_stitch(net: Supernet, k: int, pos: int, tag: str, path: Path, env: dict, bar) -> dict:
    """Train stitched configuration ``k`` alone (resuming its checkpoint when one was made with ``tag``), save its
    tensors to ``path``; returns its record (steps, history, losses, wall time, val accuracy)."""
    cfg, seed, train, val, spe, total, out = (env[k2] for k2 in ("cfg", "seed", "train", "val", "spe", "total", "out"))
    rank, world, device, use_amp, on_step = (env[k2] for k2 in ("rank", "world", "device", "use_amp", "on_step"))
    teacher, c = env["teachers"].get(k), net.configs[k]
    ck_path = out / CKPT_DIR / f"{k}.ckpt"
    ck = load_checkpoint(ck_path) if ck_path.is_file() else None
    if ck is not None and not Trainer.matches(ck, tag):
        if not env["restart"]:
            raise KlasError(f"{ck_path}: checkpoint was made with other settings, another selection or an older "
                            f"klas; delete it (or pass --restart) to start over")
        ck = None
    # NOTE: every stitch starts from its own seed, so it does not depend on which stitches ran before it
    torch.manual_seed(_derive(seed, "stitch", k))
    sn = trainable_stitch(net.view(c.source), net.view(c.target), c, net.stitches[str(k)], cfg.recipe,
                          cfg.lora_rank, cfg.lora_alpha, torch.Generator().manual_seed(_derive(seed, "lora", k)))
    sn.to(device)
    scale = None if cfg.anchor_lr_scale == 1.0 or cfg.recipe == "frozen" else (
        lambda name: 1.0 if name.startswith("layer.") else cfg.anchor_lr_scale)
    tr = Trainer(sn, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total,
                 warmup_steps=int(round(cfg.warmup_frac * total)), min_lr=cfg.min_lr, clip_grad=cfg.clip_grad,
                 no_decay=True, lr_scale=scale)
    state = dict(history=[], losses=[], wall_s=0.0)
    if ck is not None:
        tr.load_state_dict(ck)
        state = ck["state"]
        if rank == 0 and env["progress"]:
            print(f"[{cfg.recipe}] {c.key}: resuming at step {tr.step}/{total}", flush=True)
    bar.update(tr.step)
    model = _wrap(sn, cfg, device) if world > 1 else sn

    def save_ckpt() -> None:
        if rank == 0:
            tr.save(ck_path, resume_tag=tag, state=state)
        _barrier(world)

    set_train_mode(sn, cfg.recipe)
    while tr.step < total:
        epoch = tr.step // spe
        t0 = time.perf_counter()
        for x, y in _rest_of_epoch(tr.step, spe, train, cfg, seed, rank, world, device):
            lr = tr.lr
            loss = _accumulate(model, x, y, None, cfg, device.type, use_amp, world, teacher)
            tr.update()
            state["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cfg=k)
            if on_step is not None:
                on_step(pos * total + tr.step)
            if cfg.ckpt_every and tr.step % cfg.ckpt_every == 0 and tr.step % spe:
                state["wall_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_ckpt()
        state["wall_s"] += time.perf_counter() - t0
        done = state["losses"][epoch * spe:]
        state["history"].append(dict(epoch=epoch + 1, step=tr.step, lr=lr, loss=sum(done) / len(done)))
        save_ckpt()
    sn.eval()
    state.update(steps=tr.step, val_acc=config_accuracy(sn, val, device=device, sharded=True) if val else None)
    sn.cpu()
    if rank == 0:
        save_tensors(stitch_tensors_to_save(sn, cfg.recipe), path,
                     metadata=dict(resume_tag=tag, config=c.key, recipe=cfg.recipe, state=json.dumps(state)))
        ck_path.unlink(missing_ok=True)
    _barrier(world)
    return state


def _remove_stale(out: Path, recipe: str, files: dict[int, str]) -> None:
    """Per-configuration files this run does not list (an earlier run's, with other settings), and the per-stitch
    checkpoints of a finished run."""
    if recipe == "shared":
        for d in (CONFIG_DIR, CKPT_DIR):
            shutil.rmtree(out / d, ignore_errors=True)
        return
    keep = {Path(f).name for f in files.values()}
    for f in (out / CONFIG_DIR).glob("*.safetensors"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    shutil.rmtree(out / CKPT_DIR, ignore_errors=True)


def _accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int | None, cfg: FinetuneConfig,
                device_type: str, use_amp: bool, world: int, teacher: nn.Module | None = None) -> torch.Tensor:
    """Forward + backward of configuration ``k`` (None: ``model`` is one standalone network) on this rank's shard in
    ``accum_steps`` micro-batches, each loss weighted by its share of the shard (so the gradient is the shard mean,
    as in one pass); gradients are only synchronised on the last micro-batch. ``teacher``: the frozen network whose
    logits on the same images are distilled (``distill_loss``). Returns the shard's mean loss. A failed collective
    becomes a KlasError."""
    from contextlib import nullcontext

    parts = [p for p in zip(x.tensor_split(cfg.accum_steps), y.tensor_split(cfg.accum_steps)) if len(p[1])]
    total = torch.zeros((), device=x.device)
    try:
        for m, (xm, ym) in enumerate(parts):
            sync = m == len(parts) - 1 or world == 1 or not hasattr(model, "no_sync")
            with (nullcontext() if sync else model.no_sync()):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(xm, k) if k is not None else model(xm)
                    with torch.no_grad():
                        t_logits = teacher(xm) if teacher is not None else None
                loss = distill_loss(logits, ym, t_logits, cfg) * (len(ym) / len(y))
                loss.backward()
            total += loss.detach()
    except RuntimeError as e:
        if world > 1:
            raise kd.peer_failure(e, "supernet gradient all_reduce") from None
        raise
    return total


def _summary(net: Supernet, fam: Family, sel_path: Path, ctx: dict, state: dict, init_stats: dict, val_final,
             cfg: FinetuneConfig, teacher_of: dict, weight_files: dict) -> dict:
    sel = load_json(sel_path)
    views = {v.name: v for v in fam}
    rows = []
    for k, c in enumerate(net.configs):
        rows.append(dict(index=k, key=c.key, config=c.to_dict(), anchor=c.is_anchor, flops=net.net(k).flops,
                         stitch=None if c.is_anchor else str(k), init=init_stats.get(k), samples=state["counts"][k],
                         images=state["counts"][k] * cfg.batch_size, teacher=teacher_of.get(k),
                         trained=state["counts"][k] > 0, weights=weight_files.get(k),
                         val_acc_init=None if state["val_init"] is None else state["val_init"][k],
                         val_acc=None if val_final is None else val_final[k]))
    any_view = next(iter(views.values()))
    if cfg.recipe == "shared":
        files = dict(checkpoint=CKPT, anchors=ANCHORS, stitch_layers=STITCHES, init_stitch_layers=INIT_STITCHES)
    else:
        files = dict(checkpoints=CKPT_DIR, anchors=ANCHORS, anchors_state="untouched", stitch_layers=STITCHES,
                     init_stitch_layers=INIT_STITCHES, configs=CONFIG_DIR)
    return dict(
        recipe=cfg.recipe, images_seen=sum(r["images"] for r in rows),
        family=fam.name, num_classes=int(getattr(any_view.model, "num_classes", 0)) or None,
        input_shape=list(any_view.input_shape), anchor_flops={n: v.flops for n, v in views.items()},
        selection=dict(path=str(sel_path), method=sel.get("method"), n_selected=len(sel.get("selected", [])),
                       n_finetuned=sum(not c.is_anchor for c in net.configs)),
        **ctx, wall_s=round(state["wall_s"], 2), history=state["history"], configs=rows, files=files,
        machine=_machine())


def _plot_training(losses: list[float], path: Path, curves: dict[str, list[float]] | None = None) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klas.io import atomic_path

    def smooth(v: list[float]) -> list[float]:
        w = max(1, len(v) // 50)
        return [sum(v[max(0, s - w + 1):s + 1]) / len(v[max(0, s - w + 1):s + 1]) for s in range(len(v))]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if curves:  # independent / frozen: one curve per stitch, each over its own steps
        for key, v in curves.items():
            ax.plot(smooth(v), lw=1.2, label=key)
        ax.set_title("finetuning, one network per stitch (moving mean)")
        ax.legend(fontsize=6)
    else:
        ax.plot(losses, lw=0.5, alpha=0.4, label="step loss (sampled config)")
        ax.plot(smooth(losses), lw=1.5, label=f"moving mean ({max(1, len(losses) // 50)} steps)")
        ax.set_title("supernetwork finetuning")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --- reloading ----------------------------------------------------------------------------------------------------

def _run_path(run_dir: Path | str | RunDir) -> Path:
    return run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)


def load_supernet(run_dir: Path | str | RunDir, state: str = "final", anchors: list[str] | None = None,
                  family: Family | None = None, merge_lora: bool = True) -> tuple[Supernet, dict]:
    """Rebuild the configurations of a finetuned run: ``state='final'`` (finetuned) or ``'init'`` (pretrained anchors
    and the stitch layers as initialised, before finetuning). ``anchors`` restricts it to configurations over those
    anchors. Returns (networks in eval mode, supernet.json): for the ``shared`` recipe the ``Supernet``; for
    ``independent`` / ``frozen`` (final) a ``StitchSet`` with the same interface (``indices``, ``net(k)``) whose
    anchor configurations are the untouched anchors and whose ``net(k)`` builds stitch k's own network
    (``merge_lora``: LoRA adapters folded into the Linear layers). ``state='init'`` is the same for every recipe."""
    if state not in ("final", "init"):
        raise KlasError(f"state {state!r}: expected final or init")
    sdir = _run_path(run_dir) / "finetune"
    meta_path = sdir / META
    if not meta_path.is_file():
        raise KlasError(f"{meta_path}: missing; run the finetune stage first")
    meta = load_json(meta_path)
    configs = [StitchConfig.from_dict(r["config"], f"{meta_path}: configs[{r['index']}]") for r in meta["configs"]]
    keep = [k for k, c in enumerate(configs) if anchors is None or {c.source, c.target} <= set(anchors)]
    needed = sorted({n for k in keep for n in (configs[k].source, configs[k].target)})
    if family is None:
        if state == "init" and not meta.get("pretrained"):
            raise KlasError(f"{meta_path}: this run's anchors were passed in, not built from the registry; pass the "
                            f"same family to rebuild its pre-finetuning state")
        kw = dict(num_classes=meta.get("num_classes"), input_shape=tuple(meta["input_shape"]), anchors=needed)
        family = (create_family(meta["family"], **kw) if state == "final"
                  else create_family(meta["family"], pretrained=True, weights=meta.get("weights"), **kw))
    recipe = (meta.get("cfg") or {}).get("recipe", "shared")
    if state == "final" and recipe != "shared":
        rows = {r["index"]: r for r in meta["configs"]}
        files = {k: sdir / rows[k]["weights"] for k in keep if rows[k].get("weights")}
        net = StitchSet(family, configs, recipe, files, subset=keep, lora_rank=int(meta["cfg"].get("lora_rank", 4)),
                        lora_alpha=float(meta["cfg"].get("lora_alpha", 8.0)), merge=merge_lora)
    else:
        net = Supernet(family, configs, subset=keep)
    if state == "final":
        tensors = load_tensors(sdir / ANCHORS)
        net.load_anchor_tensors(tensors, str(sdir / ANCHORS))
    stitches = load_tensors(sdir / (STITCHES if state == "final" else INIT_STITCHES))
    net.load_stitch_tensors(stitches, str(sdir / (STITCHES if state == "final" else INIT_STITCHES)))
    net.eval()
    return net, meta


def load_stitched(run_dir: Path | str | RunDir, config: StitchConfig | dict | str, state: str = "final",
                  merge_lora: bool = True) -> StitchedNet:
    """One finetuned standalone stitched network of a run (eval mode), by StitchConfig, {source,i,target,j} or key.
    Only the one or two anchors it uses are built. Every recipe: shared (from the supernetwork), independent (the
    stitch's own anchor copies), frozen (untouched anchors + its stitch layer and LoRA adapters, merged into the
    Linear layers unless ``merge_lora`` is False); an anchor configuration of independent / frozen is the untouched
    anchor."""
    meta_path = _run_path(run_dir) / "finetune" / META
    if not meta_path.is_file():
        raise KlasError(f"{meta_path}: missing; run the finetune stage first")
    meta = load_json(meta_path)
    if isinstance(config, dict):
        config = StitchConfig.from_dict(config)
    keys = [r["key"] for r in meta["configs"]]
    key = config if isinstance(config, str) else config.key
    if key not in keys:
        raise KlasError(f"{meta_path}: no configuration {key!r}; the run has: {', '.join(keys)}")
    c = StitchConfig.from_dict(meta["configs"][keys.index(key)]["config"])
    net, _ = load_supernet(run_dir, state, anchors=sorted({c.source, c.target}), merge_lora=merge_lora)
    return net.net(keys.index(key))


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "finetune", FinetuneConfig, FinetuneArtifact, ("selection",)
DESCRIBE = "least-squares stitch init + finetuning (recipe: shared supernetwork, independent, frozen + LoRA)"


def run(cfg: FinetuneConfig, ctx: StageContext) -> FinetuneArtifact:
    # NOTE: restart: a checkpoint made under other settings belongs to a stale run of this stage (the pipeline
    # re-runs it because its key changed), so it is discarded rather than refused
    return finetune_supernet(ctx.run_dir, cfg, seed=ctx.seed, family=ctx.run.family, weights=ctx.run.weights,
                             data_root=ctx.data_root, dataset=ctx.data.dataset, progress=ctx.progress, restart=True,
                             data=ctx.data)


def summary(art: FinetuneArtifact) -> dict:
    return dict(recipe=art.recipe, configurations=len(art.configs), steps=art.steps, images_seen=art.images_seen,
                wall_s=art.wall_s)
