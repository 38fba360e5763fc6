"""The stitched supernetwork (SN-Net, Pan et al., CVPR 2023): anchors shared by every selected configuration, one
stitch layer per stitched configuration, and finetuning that trains one sampled configuration per step.

Determinism is by construction, so that a resumed run equals an uninterrupted one and every DDP rank agrees:

* the configuration of global step ``s`` is a pure function of (seed, s) (``config_at``); every rank computes the
  same one, so all ranks run the same sub-network and DDP reduces gradients of the same parameters;
* the data order of epoch ``e`` comes from a generator seeded by (seed, e); a resumed epoch replays its first
  batches without training on them (cheap: indexing + augmentation) to reach the same position;
* the learning rate is a pure function of the step; optimizer state, torch's global RNG and the history travel in
  the checkpoint.

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
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from klas import distributed as kd
from klas.errors import KlasError
from klas.families import Family, create_family, stitchable
from klas.io import load_checkpoint, load_json, load_tensors, save_checkpoint, save_json, save_tensors
from klas.rundir import RunDir
from klas.stitch import FitCfg, StitchConfig, StitchedNet, StitchLayer, fit_stitch

CKPT, ANCHORS, STITCHES, INIT_STITCHES, META = ("supernet.ckpt", "anchors.safetensors", "stitch_layers.safetensors",
                                                 "init_stitch_layers.safetensors", "supernet.json")
SAMPLING = ("balanced", "uniform")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class FinetuneCfg:
    """Supernetwork finetuning budget and recipe.

    ``epochs`` x ``steps_per_epoch`` is the budget (None: one pass over the train split per epoch). ``sampling``:
    ``uniform`` draws a configuration per step i.i.d. (SN-Net); ``balanced`` (default) walks seeded permutations of
    all configurations so each gets the same number of steps (+-1) under any budget -- fairer for short budgets.
    ``amp``: auto (bf16 autocast on CUDA, off on CPU), bf16, or off. ``ckpt_every``: also checkpoint every K steps.
    Multi-process (torchrun) only: ``accum_steps`` micro-batches per rank and step (same result, less memory),
    ``parallel``: ddp (default) or fsdp (CUDA only).
    """

    epochs: int = 1
    steps_per_epoch: int | None = None
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    clip_grad: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True
    train_samples: int | None = None
    sampling: str = "balanced"
    seed: int = 0
    amp: str = "auto"
    init: FitCfg = FitCfg()
    val_samples: int = 1000
    ckpt_every: int = 0
    accum_steps: int = 1
    parallel: str = "ddp"

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise KlasError(f"--sampling {self.sampling!r}: expected one of {', '.join(SAMPLING)}")
        if self.amp not in ("auto", "bf16", "off"):
            raise KlasError(f"--amp {self.amp!r}: expected auto, bf16 or off")
        if self.epochs < 1 or (self.steps_per_epoch is not None and self.steps_per_epoch < 1):
            raise KlasError(f"finetune budget: epochs ({self.epochs}) and steps per epoch must be >= 1")
        if self.accum_steps < 1:
            raise KlasError(f"--accum-steps {self.accum_steps}: must be >= 1")
        if self.parallel not in PARALLEL:
            raise KlasError(f"--parallel {self.parallel!r}: expected one of {', '.join(PARALLEL)}")


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


def lr_at(step: int, total: int, cfg: FinetuneCfg) -> float:
    """Linear warm-up over ``warmup_frac`` of the budget, then cosine decay from ``lr`` to ``min_lr``."""
    warm = int(round(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _stream(data, cfg: FinetuneCfg, epoch: int, rank: int, world: int):
    """Training batches of epoch ``epoch``: seeded passes over the data, repeated as needed, rank-sharded."""
    from klas.data import batches

    gen = torch.Generator().manual_seed(_derive(cfg.seed, "data", epoch))
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


def _wrap(net: Supernet, cfg: FinetuneCfg, device: torch.device) -> nn.Module:
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

def _fingerprint(family: str, weights, configs: list[StitchConfig], cfg: FinetuneCfg) -> str:
    # NOTE: settings that do not change the result (checkpoint cadence, micro-batching, wrapper) stay out, so a
    # relaunch with other values resumes the same run
    d = asdict(replace(cfg, ckpt_every=0))
    for key in ("accum_steps", "parallel"):
        d.pop(key)
    return hashlib.sha256(json.dumps([family, str(weights), [c.key for c in configs], d], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def _init_fingerprint(family: str, weights, configs: list[StitchConfig], init: FitCfg) -> str:
    return hashlib.sha256(json.dumps([family, str(weights), [c.key for c in configs], asdict(init)],
                                     sort_keys=True, default=str).encode()).hexdigest()[:16]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on biases, norms, position embeddings and class tokens (the usual ViT/timm convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


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


def _init_layers(net: Supernet, train, cfg: FinetuneCfg, path: Path, fp: str, rank: int,
                 progress: bool) -> dict[int, dict]:
    """Fit every stitch layer (or reload the fit made before an interruption); returns per-config fit statistics."""
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == fp:
            net.load_stitch_tensors(load_tensors(path), str(path))
            return {int(k): v for k, v in json.loads(meta["stats"]).items()}
    stats: dict[int, dict] = {}
    todo = [k for k, c in enumerate(net.configs) if not c.is_anchor]
    for k in tqdm(todo, desc=f"[supernet] init stitch layers ({cfg.init.method})", disable=not progress or rank != 0):
        c = net.configs[k]
        fit = replace(cfg.init, seed=_derive(cfg.init.seed, "init", k) & 0xFFFFFFFF)
        layer, st = fit_stitch(net.view(c.source), c.i, net.view(c.target), c.j, train, fit)
        net.stitches[str(k)].load_state_dict(layer.state_dict())
        stats[k] = st
    if rank == 0:
        save_tensors(net.stitch_tensors(), path, metadata=dict(fingerprint=fp, stats=json.dumps(stats)))
    return stats


def finetune_supernet(run_dir: Path | str | RunDir, selection_path: Path | str | None = None,
                      cfg: FinetuneCfg = FinetuneCfg(), family: str | Family | None = None, weights=None,
                      data_root: Path | str | None = None, dataset: str | None = None, progress: bool = True,
                      restart: bool = False, on_step=None) -> dict:
    """Initialise the stitch layers and finetune the supernetwork of a selection; resumable, DDP-ready.

    Writes ``run_dir/supernet/``: ``supernet.ckpt`` (training state: every epoch and every ``cfg.ckpt_every``
    steps), ``init_stitch_layers.safetensors`` (stitch layers before finetuning), ``stitch_layers.safetensors`` and
    ``anchors.safetensors`` (finetuned weights), ``supernet.json`` (configurations, figures, history) and
    ``training.png``. A finished run with the same settings is returned from its ``supernet.json`` unchanged.

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
        raise KlasError(f"{sel_path}: selection file not found (run `klas select` or pass --selection)")
    fam_name = family.name if isinstance(family, Family) else family
    if fam_name is None:
        fam_name = load_json(sel_path).get("family")
    if run is None:
        run = RunDir(run_dir, fam_name)
    fam_name = fam_name or run.family
    out = run.stage("supernet")
    fam = _build_family(family if family is not None else fam_name, weights)
    configs = read_selection(sel_path, fam)
    fp = _fingerprint(fam.name, weights, configs, cfg)
    if (out / META).is_file() and (out / STITCHES).is_file() and (out / ANCHORS).is_file():
        meta = load_json(out / META)
        if meta.get("fingerprint") == fp:
            return meta

    dataset = dataset or run.meta.get("dataset") or fam.cfg.dataset
    train = load_dataset(dataset, "train", data_root).subset(cfg.train_samples)
    val = load_dataset(dataset, "val", data_root).subset(cfg.val_samples) if cfg.val_samples else None
    spe = cfg.steps_per_epoch or (len(train) // cfg.batch_size)
    if spe < 1:
        raise KlasError(f"--batch-size {cfg.batch_size}: larger than the training set ({len(train)} images)")
    kd.check_divisible(cfg.batch_size, world)
    total = cfg.epochs * spe

    device = kd.info().device
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    net = Supernet(fam, configs)
    init_stats = _init_layers(net, train, cfg, out / INIT_STITCHES,
                              _init_fingerprint(fam.name, weights, configs, cfg.init), rank, progress)
    ck = load_checkpoint(out / CKPT) if (out / CKPT).is_file() else None
    if ck is not None and ck.get("fingerprint") != fp and restart:
        ck = None
    if ck is not None and ck.get("fingerprint") != fp:
        raise KlasError(f"{out / CKPT}: checkpoint was made with other settings or another selection; delete it "
                        f"(or pass --restart) to start over")
    state = dict(step=0, history=[], losses=[], counts=[0] * len(configs), wall_s=0.0, val_init=None)
    if val is not None and ck is None:
        state["val_init"] = [config_accuracy(net.net(k), val, sharded=True) for k in range(len(configs))]
    net.to(device)
    opt = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    if ck is not None:
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        torch.set_rng_state(ck["torch_rng"])
        if rank == 0 and progress:
            print(f"[supernet] resuming at step {state['step']}/{total}", flush=True)
    model = _wrap(net, cfg, device) if world > 1 else net

    def save_ckpt() -> None:
        if rank == 0:
            save_checkpoint(dict(fingerprint=fp, model=net.state_dict(), opt=opt.state_dict(), state=state,
                                 torch_rng=torch.get_rng_state()), out / CKPT)
        _barrier(world)

    params = [p for p in net.parameters()]
    bar = tqdm(total=total, initial=state["step"], desc=f"[supernet] finetune {len(configs)} configs",
               disable=not progress or rank != 0)
    net.train()
    while state["step"] < total:
        epoch, pos = divmod(state["step"], spe)
        t0 = time.perf_counter()
        stream = itertools.islice(_stream(train, cfg, epoch, rank, world), pos, None)
        for _ in range(pos, spe):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            step = state["step"]
            k = config_at(step, len(configs), cfg.seed, cfg.sampling)
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = _accumulate(model, x, y, k, cfg, device.type, use_amp, world)
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.clip_grad)
            opt.step()
            state["step"] = step + 1
            state["counts"][k] += 1
            state["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cfg=k)
            if on_step is not None:
                on_step(state["step"])
            if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0 and state["step"] % spe:
                state["wall_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_ckpt()
        state["wall_s"] += time.perf_counter() - t0
        done = state["losses"][epoch * spe:]  # the whole epoch, also when it was resumed midway
        state["history"].append(dict(epoch=epoch + 1, step=state["step"], lr=lr, loss=sum(done) / len(done)))
        save_ckpt()
    bar.close()
    net.eval()
    val_final = ([config_accuracy(net.net(k), val, device=device, sharded=True) for k in range(len(configs))]
                 if val else None)
    net.cpu()
    ctx = dict(weights=None if weights is None else str(weights), pretrained=not isinstance(family, Family),
               dataset=dataset, fingerprint=fp, cfg=asdict(cfg), steps=total, steps_per_epoch=spe, world_size=world)
    meta = _summary(net, fam, sel_path, ctx, state, init_stats, val_final)
    if rank == 0:
        save_tensors(net.anchor_tensors(), out / ANCHORS, metadata=dict(family=fam.name))
        save_tensors(net.stitch_tensors(), out / STITCHES, metadata=dict(family=fam.name))
        save_json(meta, out / META)
        _plot_training(state["losses"], out / "training.png")
    _barrier(world)
    return meta


def _accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, cfg: FinetuneCfg, device_type: str,
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
    sdir = _run_path(run_dir) / "supernet"
    meta_path = sdir / META
    if not meta_path.is_file():
        raise KlasError(f"{meta_path}: missing; run `klas finetune` first")
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
    meta_path = _run_path(run_dir) / "supernet" / META
    if not meta_path.is_file():
        raise KlasError(f"{meta_path}: missing; run `klas finetune` first")
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
