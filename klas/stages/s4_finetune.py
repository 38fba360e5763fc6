"""The stitched supernetwork (SN-Net, Pan et al., CVPR 2023): anchors shared by every selected configuration, one
stitch layer per stitched configuration, and finetuning that trains one sampled configuration per step.

Determinism is by construction, so that a resumed run equals an uninterrupted one and every DDP rank agrees:

* the configuration of global step ``s`` is a pure function of (seed, s) (``config_at``); every rank computes the
  same one, so all ranks run the same sub-network and DDP reduces gradients of the same parameters;
* the data order of epoch ``e`` comes from a generator seeded by (seed, e); a resumed epoch replays its first
  batches without training on them (cheap: indexing + augmentation) to reach the same position;
* the learning rate is a closed form of the step (``klas.train.WarmupCosineLR``); weights, optimizer and schedule
  state, torch's global RNG and the history travel in the checkpoint (``klas.train.Trainer``).

DDP: each step runs one configuration, so most parameters (other stitch layers, skipped blocks, other anchors) get
no gradient; the model is wrapped with ``find_unused_parameters=True`` (the used set is identical on every rank
because the sampled configuration is). Only rank 0 writes files. ``accum_steps`` splits each rank's shard of a
step's global batch into micro-batches (no gradient sync until the last): a memory knob that leaves the result
unchanged. ``parallel="fsdp"`` wraps the supernetwork in torch's FSDP instead (large anchors; needs CUDA -- see
docs/scale-out.md). Collective failures (a dead or hung peer) end the job with a one-line KlasError.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import platform
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
from klas.io import load_checkpoint, load_json, load_tensors, save_json, save_tensors
from klas.contract import Artifact, StageContext, digest, key_fields, setting
from klas.rundir import RunDir
from klas.stitch import FitCfg, StitchConfig, StitchedNet, StitchLayer, fit_stitch
from klas.train import Trainer, progress_bar

CKPT, ANCHORS, STITCHES, INIT_STITCHES, META = ("supernet.ckpt", "anchors.safetensors", "stitch_layers.safetensors",
                                                 "init_stitch_layers.safetensors", "supernet.json")
SAMPLING = ("balanced", "uniform")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning of the selected stitches in one SN-Net supernetwork (anchors shared by every configuration).

    ``epochs`` x ``steps_per_epoch`` is the budget. ``sampling``: ``uniform`` draws a configuration per step i.i.d.
    (SN-Net); ``balanced`` walks seeded permutations of all configurations so each gets the same number of steps
    (+-1) under any budget -- fairer for short budgets. Under torchrun, ``accum_steps`` micro-batches per rank and
    step (same result, less memory) and ``parallel`` (ddp, or fsdp on CUDA) change memory and speed, not results.
    """

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
    sampling: str = setting("balanced", "configuration per step", choices=SAMPLING)
    amp: str = setting("auto", "bf16 autocast: auto = on CUDA only", choices=("auto", "bf16", "off"))
    ckpt_every: int = setting(0, "also checkpoint every K steps (0: at epoch ends only)", ge=0, key=False)
    accum_steps: int = setting(1, "micro-batches per rank and step (torchrun)", ge=1, key=False)
    parallel: str = setting("ddp", "data-parallel wrapper under torchrun", choices=PARALLEL, key=False)
    init: FitCfg = FitCfg()


@dataclass(frozen=True)
class FinetuneArtifact(Artifact):
    """``anchors.safetensors`` + ``stitch_layers.safetensors`` (finetuned), ``init_stitch_layers.safetensors`` (as
    initialised) and this record: one row per configuration (key, config, flops, samples, val accuracy)."""

    KIND: ClassVar[str] = "finetune"
    RECORD: ClassVar[str] = META
    FILES: ClassVar[tuple[str, ...]] = (ANCHORS, STITCHES, INIT_STITCHES)
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
                      restart: bool = False, on_step=None) -> FinetuneArtifact:
    """Initialise the stitch layers and finetune the supernetwork of a selection; resumable, DDP-ready.

    Writes ``run_dir/finetune/``: ``supernet.ckpt`` (training state: every epoch and every ``cfg.ckpt_every``
    steps), ``init_stitch_layers.safetensors`` (stitch layers before finetuning), ``stitch_layers.safetensors`` and
    ``anchors.safetensors`` (finetuned weights), ``supernet.json`` (the artifact record) and ``training.png``.

    Args:
        selection_path: a selection.json (default: ``run_dir/selection/selection.json``).
        family: a family name or an already built Family (trained in place); default: the run's family.
        weights: anchor weights for ``create_family`` (default: the family's pretrained/shipped weights).
        restart: discard a checkpoint made with other settings instead of refusing to touch it (one made with
            these settings is always resumed).
        on_step: called with the global step after each optimizer step (a test hook: raising there simulates a
            crash between checkpoints).
    """
    from klas.data import load_dataset

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
    configs = read_selection(sel_path, fam)
    fp = _resume_tag(fam.name, weights, configs, cfg, seed)

    dataset = dataset or run.meta.get("dataset") or fam.cfg.dataset
    train = load_dataset(dataset, "train", data_root).subset(cfg.train_subset)
    val = load_dataset(dataset, "val", data_root).subset(cfg.val_images) if cfg.val_images else None
    spe = cfg.steps_per_epoch or (len(train) // cfg.batch_size)
    if spe < 1:
        raise KlasError(f"--batch-size {cfg.batch_size}: larger than the training set ({len(train)} images)")
    kd.check_divisible(cfg.batch_size, world)
    total = cfg.epochs * spe

    device = kd.info().device
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    torch.manual_seed(seed)
    net = Supernet(fam, configs)
    init_stats = _init_layers(net, train, cfg, seed, out / INIT_STITCHES,
                              _resume_tag(fam.name, weights, configs, cfg.init, seed), rank, progress)
    ck = load_checkpoint(out / CKPT) if (out / CKPT).is_file() else None
    if ck is not None and not Trainer.matches(ck, fp) and restart:
        ck = None
    if ck is not None and not Trainer.matches(ck, fp):
        raise KlasError(f"{out / CKPT}: checkpoint was made with other settings, another selection or an older klas; "
                        f"delete it (or pass --restart) to start over")
    state = dict(history=[], losses=[], counts=[0] * len(configs), wall_s=0.0, val_init=None)
    if val is not None and ck is None:
        state["val_init"] = [config_accuracy(net.net(k), val, sharded=True) for k in range(len(configs))]
    net.to(device)
    # warm-up over warmup_frac of the budget, cosine to min_lr; no decay on biases, norms, embeddings
    tr = Trainer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total,
                 warmup_steps=int(round(cfg.warmup_frac * total)), min_lr=cfg.min_lr, clip_grad=cfg.clip_grad,
                 no_decay=True)
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

    bar = progress_bar(total=total, initial=tr.step, desc=f"[supernet] finetune {len(configs)} configs",
                       enabled=progress, file=sys.stderr, leave=True)
    net.train()
    while tr.step < total:
        epoch, pos = divmod(tr.step, spe)
        t0 = time.perf_counter()
        stream = itertools.islice(_stream(train, cfg, seed, epoch, rank, world), pos, None)
        for _ in range(pos, spe):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            k = config_at(tr.step, len(configs), seed, cfg.sampling)
            lr = tr.lr  # this step's learning rate (the history records the last one of each epoch)
            loss = _accumulate(model, x, y, k, cfg, device.type, use_amp, world)
            tr.update()
            state["counts"][k] += 1
            state["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cfg=k)
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
    val_final = ([config_accuracy(net.net(k), val, device=device, sharded=True) for k in range(len(configs))]
                 if val else None)
    net.cpu()
    ctx = dict(weights=None if weights is None else str(weights), pretrained=not isinstance(family, Family),
               dataset=dataset, cfg=dict(asdict(cfg), seed=seed), steps=total, steps_per_epoch=spe, world_size=world)
    art = FinetuneArtifact(**_summary(net, fam, sel_path, ctx, state, init_stats, val_final))
    if rank == 0:
        save_tensors(net.anchor_tensors(), out / ANCHORS, metadata=dict(family=fam.name))
        save_tensors(net.stitch_tensors(), out / STITCHES, metadata=dict(family=fam.name))
        art.save(out)
        _plot_training(state["losses"], out / "training.png")
    _barrier(world)
    return art


def _accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, cfg: FinetuneConfig, device_type: str,
                use_amp: bool, world: int) -> torch.Tensor:
    """Forward + backward of configuration ``k`` on this rank's shard in ``accum_steps`` micro-batches, each loss
    weighted by its share of the shard (so the gradient is the shard mean, as in one pass); gradients are only
    synchronised on the last micro-batch. Returns the shard's mean loss. A failed collective becomes a KlasError."""
    from contextlib import nullcontext

    parts = [p for p in zip(x.tensor_split(cfg.accum_steps), y.tensor_split(cfg.accum_steps)) if len(p[1])]
    total = torch.zeros((), device=x.device)
    try:
        for m, (xm, ym) in enumerate(parts):
            sync = m == len(parts) - 1 or world == 1 or not hasattr(model, "no_sync")
            with (nullcontext() if sync else model.no_sync()):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(xm, k)
                loss = F.cross_entropy(logits.float(), ym, label_smoothing=cfg.label_smoothing) * (len(ym) / len(y))
                loss.backward()
            total += loss.detach()
    except RuntimeError as e:
        if world > 1:
            raise kd.peer_failure(e, "supernet gradient all_reduce") from None
        raise
    return total


def _summary(net: Supernet, fam: Family, sel_path: Path, ctx: dict, state: dict, init_stats: dict, val_final) -> dict:
    sel = load_json(sel_path)
    views = {v.name: v for v in fam}
    rows = []
    for k, c in enumerate(net.configs):
        rows.append(dict(index=k, key=c.key, config=c.to_dict(), anchor=c.is_anchor, flops=net.net(k).flops,
                         stitch=None if c.is_anchor else str(k), init=init_stats.get(k), samples=state["counts"][k],
                         val_acc_init=None if state["val_init"] is None else state["val_init"][k],
                         val_acc=None if val_final is None else val_final[k]))
    any_view = next(iter(views.values()))
    return dict(
        family=fam.name, num_classes=int(getattr(any_view.model, "num_classes", 0)) or None,
        input_shape=list(any_view.input_shape), anchor_flops={n: v.flops for n, v in views.items()},
        selection=dict(path=str(sel_path), method=sel.get("method"), n_selected=len(sel.get("selected", []))),
        **ctx, wall_s=round(state["wall_s"], 2), history=state["history"], configs=rows,
        files=dict(checkpoint=CKPT, anchors=ANCHORS, stitch_layers=STITCHES, init_stitch_layers=INIT_STITCHES),
        machine=_machine())


def _plot_training(losses: list[float], path: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klas.io import atomic_path

    w = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, s - w + 1):s + 1]) / len(losses[max(0, s - w + 1):s + 1]) for s in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="step loss (sampled config)")
    ax.plot(smooth, lw=1.5, label=f"moving mean ({w} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("supernetwork finetuning")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --- reloading ----------------------------------------------------------------------------------------------------

def _run_path(run_dir: Path | str | RunDir) -> Path:
    return run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)


def load_supernet(run_dir: Path | str | RunDir, state: str = "final", anchors: list[str] | None = None,
                  family: Family | None = None) -> tuple[Supernet, dict]:
    """Rebuild the supernetwork of a finetuned run: ``state='final'`` (finetuned) or ``'init'`` (pretrained anchors
    and the stitch layers as initialised, before finetuning). ``anchors`` restricts it to configurations over those
    anchors. Returns (supernet in eval mode, supernet.json)."""
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
    net = Supernet(family, configs, subset=keep)
    if state == "final":
        tensors = load_tensors(sdir / ANCHORS)
        net.load_anchor_tensors(tensors, str(sdir / ANCHORS))
    stitches = load_tensors(sdir / (STITCHES if state == "final" else INIT_STITCHES))
    net.load_stitch_tensors(stitches, str(sdir / (STITCHES if state == "final" else INIT_STITCHES)))
    net.eval()
    return net, meta


def load_stitched(run_dir: Path | str | RunDir, config: StitchConfig | dict | str, state: str = "final"
                  ) -> StitchedNet:
    """One finetuned standalone stitched network of a run (eval mode), by StitchConfig, {source,i,target,j} or key.
    Only the one or two anchors it uses are built."""
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
    net, _ = load_supernet(run_dir, state, anchors=sorted({c.source, c.target}))
    return net.net(keys.index(key))


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "finetune", FinetuneConfig, FinetuneArtifact, ("selection",)
DESCRIBE = "least-squares stitch init + supernetwork finetuning"


def run(cfg: FinetuneConfig, ctx: StageContext) -> FinetuneArtifact:
    # NOTE: restart: a checkpoint made under other settings belongs to a stale run of this stage (the pipeline
    # re-runs it because its key changed), so it is discarded rather than refused
    return finetune_supernet(ctx.run_dir, cfg, seed=ctx.seed, family=ctx.run.family, weights=ctx.run.weights,
                             data_root=ctx.data_root, dataset=ctx.data.dataset, progress=ctx.progress, restart=True)


def summary(art: FinetuneArtifact) -> dict:
    return dict(configurations=len(art.configs), steps=art.steps, wall_s=art.wall_s)
