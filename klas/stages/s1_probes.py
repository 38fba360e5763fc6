"""ProbeNet (KLAS paper, Alg. 1): one linear probe per block of every anchor, trained jointly on frozen anchors.

A probe reads what the task says of a block's output (``task.probe_features``; for images, the mean over tokens /
positions) and predicts the task's outputs (classes), trained with the task's loss. All probes of an
anchor are fed by ONE forward of the anchor per batch (``view.forward_all``); each probe gets detached features, the
probe losses are summed and one backward runs. Because the probes share no parameters and the optimizer (AdamW) is
per-parameter, this is exactly equivalent to training every probe on its own with the same seed and data order --
only ~depth times cheaper. ``tests/test_probes.py`` checks that equivalence.

Under torchrun (docs/scale-out.md) training is data-parallel: every rank holds the frozen anchors, takes its shard
of each global batch and DDP averages the probe gradients; the loss is scaled so that the average equals the
single-process mean over the global batch (also for a ragged last batch). Only rank 0 writes.

Artifacts (run dir ``probes/``): ``probes.safetensors`` (weights), ``probes.json`` (per-epoch validation accuracy of
every probe and head, wall time), ``probe_accuracy.png`` and ``checkpoint.pt`` (per epoch, for resume).
"""
from __future__ import annotations

import hashlib
import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn as nn

from klas import distributed as kd
from klas.data import ImageSet, batches, num_batches
from klas.data.loader import batch_plan
from klas.errors import KlasError
from klas.families import BlockView, Family
from klas.io import load_checkpoint, load_tensors, save_tensors
from klas.contract import Artifact, StageContext, overrides, setting
from klas.rundir import RunDir
from klas.tasks import task_of
from klas.train import AdamWSettings, Trainer, epoch_generator, progress_bar

PROBES_FILE, PROBES_JSON, PROBES_PNG = "probes.safetensors", "probes.json", "probe_accuracy.png"
CACHE_MODES = ("auto", "memory", "disk", "off")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
@overrides(epochs=4, lr=1e-2)
class ProbesConfig(AdamWSettings):
    """How probes are trained (AdamW, cosine schedule) on the train split; accuracy is tracked on val."""

    train_subset: int | None = setting(None, "train on the first N images of the fixed split order", ge=1,
                                       none="all")
    val_subset: int | None = setting(None, "track accuracy on the first N val images", ge=1, none="all")
    stat_samples: int = setting(2048, "training images the feature standardization is measured on", ge=1)
    feature_cache: str = setting("auto", "run the frozen anchors once and train every epoch on their cached block "
                                 "features (same probes, fewer forwards): auto = in memory up to cache_mb, else a "
                                 "memory-mapped file in the stage folder; memory; disk; off = a forward per epoch",
                                 choices=CACHE_MODES, key=False)
    cache_mb: int = setting(2048, "largest feature cache held in memory (auto)", ge=0, key=False)
    eval_batch_size: int = setting(1000, "samples per batch of the val evaluations (language models: sequences, "
                                   "each with its [T, V] logits)", ge=1, key=False)
    lens: str = setting("tuned", "language models' probes over the vocabulary: tuned (a d x d affine map per layer "
                        "before the anchor's frozen norm and unembedding), lowrank (rank lens_rank), logit (none)",
                        choices=("tuned", "logit", "lowrank"))
    lens_rank: int = setting(16, "rank of the lowrank lens", ge=1)


@dataclass(frozen=True)
class ProbesArtifact(Artifact):
    """``probes.safetensors`` (the probes, standardization folded in) and this record: per-epoch val accuracy of
    every probe and of every anchor's own head."""

    KIND: ClassVar[str] = "probes"
    RECORD: ClassVar[str] = PROBES_JSON
    FILES: ClassVar[tuple[str, ...]] = (PROBES_FILE,)
    family: str
    dataset: str
    n_train: int
    n_val: int
    config: dict
    anchors: list
    history: list
    final_val_acc: dict
    epochs_to_within_1pt: dict
    head_val_acc: dict
    wall_s: float
    machine: dict
    world_size: int


class ProbeNet(nn.Module):
    """The linear probes of ONE anchor: probe k maps block-k features [B, C_k] to the task's outputs.

    Features are standardized with fixed per-channel statistics (``set_stats``) before the linear map: the same
    affine family of probes, but well conditioned whatever the scale of a block's residual stream (Adam alone
    converged several points lower in 4 epochs). ``folded()`` returns plain linear weights on the raw features.
    """

    def __init__(self, anchor: str, widths: list[int], num_outputs: int, seed: int = 0):
        super().__init__()
        self.anchor, self.widths, self.num_outputs = anchor, list(widths), num_outputs
        self.probes = nn.ModuleList(nn.Linear(c, num_outputs) for c in widths)
        for k, (lin, c) in enumerate(zip(self.probes, widths)):
            init_probe(lin, probe_seed(seed, anchor, k))
            self.register_buffer(f"shift_{k}", torch.zeros(c))
            self.register_buffer(f"scale_{k}", torch.ones(c))

    @property
    def depth(self) -> int:
        return len(self.probes)

    def set_stats(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per block (mean, std) of the pooled features: probes see (f - mean) / std."""
        for k, (mean, std) in enumerate(stats):
            getattr(self, f"shift_{k}").copy_(mean)
            getattr(self, f"scale_{k}").copy_(1.0 / std)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Features of every block -> logits [depth, B, num_outputs]."""
        return torch.stack([p((f - getattr(self, f"shift_{k}")) * getattr(self, f"scale_{k}"))
                            for k, (p, f) in enumerate(zip(self.probes, feats))])

    def folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) per probe acting on the RAW pooled features: W' = W diag(scale), b' = b - W' shift."""
        out = []
        for k, lin in enumerate(self.probes):
            w = lin.weight.detach() * getattr(self, f"scale_{k}")[None, :]
            out.append((w, lin.bias.detach() - w @ getattr(self, f"shift_{k}")))
        return out


@torch.no_grad()
def feature_stats(view: BlockView, data: ImageSet, n: int = 2048, batch_size: int = 512, task=None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) per channel of every block's probe features over the first ``n`` samples (float64 sums)."""
    data = data.subset(n)
    s1 = s2 = None
    for x, _ in batches(data, batch_size):
        feats = [f.double() for f in anchor_features(view, x, task)[0]]
        s1 = [f.sum(0) for f in feats] if s1 is None else [a + f.sum(0) for a, f in zip(s1, feats)]
        s2 = [(f * f).sum(0) for f in feats] if s2 is None else [a + (f * f).sum(0) for a, f in zip(s2, feats)]
    m = len(data)
    out = []
    for a, b in zip(s1, s2):
        mean = a / m
        var = (b / m - mean * mean).clamp_min(0.0)
        out.append((mean.float(), (var.sqrt() + 1e-6).float()))
    return out


def probe_seed(seed: int, anchor: str, block: int) -> int:
    """A per-probe seed that does not depend on which other probes exist (so a probe can be trained alone)."""
    return zlib.crc32(f"{seed}:{anchor}:{block}".encode())


def init_probe(lin: nn.Linear, seed: int) -> None:
    """nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from an explicit generator."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(lin.in_features)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        lin.bias.uniform_(-bound, bound, generator=g)


@torch.no_grad()
def anchor_features(view: BlockView, x: torch.Tensor, task=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One frozen forward: every block's probe features (``task.probe_features``; default: the view's pooling),
    detached, and the anchor's own logits."""
    outs, logits = view.forward_all(x)
    feats = task.probe_features if task is not None else (lambda v, h: v.pool(h))
    return [feats(view, h) for h in outs], logits


def weights_digest(view: BlockView) -> str:
    """Content hash of an anchor's weights: probes and scores are only valid for the weights they were made on."""
    h = hashlib.sha256()
    for k, v in view.model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Every anchor's probe features of every block over a split, from ONE frozen forward per batch.

    The anchors are frozen and the probes' batches are not augmented, so each epoch's forward pass would give the
    same features again; the probe epochs read them from here instead (``take(idx)``), in the same batch order
    (``klas.data.batch_plan``). The features are what the forward gives (float32; on the CPU a sample's features do
    not depend on the batch it is in, so cached and uncached probes come out identical -- ``tests/test_probes.py``).
    Also kept: the anchors' own per-sample quality (their heads), which does not change between epochs either.
    Held in memory, or in ``.npy`` memmaps in ``folder`` (deleted by ``close``) when ``mode`` is disk, or auto and
    the cache is larger than ``limit_mb``.
    """

    def __init__(self, family: Family, data, task, *, batch_size: int, mode: str, limit_mb: int, folder: Path,
                 tag: str, progress: bool = True):
        self.files: list[Path] = []
        self.feats: dict[str, list[torch.Tensor]] = {}
        self.head_quality = {v.name: torch.empty(len(data), dtype=torch.float64) for v in family}
        bar = progress_bar(batches(data, batch_size), total=num_batches(data, batch_size),
                           desc=f"probes: caching the {tag} features", enabled=progress)
        start = 0
        for x, y in bar:
            out = {v.name: anchor_features(v, x, task) for v in family}
            if not self.feats:
                self._allocate(out, len(data), mode, limit_mb, folder, tag)
            for name, (f, logits) in out.items():
                for buf, t in zip(self.feats[name], f):
                    buf[start:start + len(t)] = t
                self.head_quality[name][start:start + len(y)] = task.quality(task.predict(logits, y)[0], y).double()
            start += len(y)
        bar.close()

    def _allocate(self, first: dict, n: int, mode: str, limit_mb: int, folder: Path, tag: str) -> None:
        import numpy as np

        nbytes = n * sum(t[0].numel() * t.element_size() for f, _ in first.values() for t in f)
        on_disk = mode == "disk" or (mode == "auto" and nbytes > limit_mb * 2 ** 20)
        for name, (f, _) in first.items():
            bufs = []
            for k, t in enumerate(f):
                shape = (n, *t.shape[1:])
                if not on_disk:
                    bufs.append(torch.empty(shape, dtype=t.dtype))
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f".feature-cache.{tag}.{name}.{k}.npy"
                self.files.append(path)
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(str(t.dtype).split(".")[-1]),
                                                shape=shape)
                bufs.append(torch.from_numpy(arr))
            self.feats[name] = bufs

    @property
    def on_disk(self) -> bool:
        return bool(self.files)

    def take(self, idx: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every anchor's block features of the samples ``idx``, as one forward of those samples gives them."""
        return {name: [buf[idx] for buf in bufs] for name, bufs in self.feats.items()}

    def close(self) -> None:
        self.feats.clear()
        for p in self.files:
            p.unlink(missing_ok=True)


@torch.no_grad()
def evaluate_probes(family: Family, nets: dict[str, ProbeNet], data: ImageSet, batch_size: int = 1000, *, task,
                    cache: FeatureCache | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The task's metric (%) of every probe and of every anchor's own head on ``data`` (sharded over ranks,
    per-sample qualities summed: every rank gets the whole-split figures); ``cache``: ``data``'s cached features."""
    di = kd.info()
    correct = {v.name: torch.zeros(nets[v.name].depth, dtype=torch.float64) for v in family}
    heads = torch.zeros(len(family), dtype=torch.float64)
    for idx, x, y in _batches(data, batch_size, cache, rank=di.rank, world=di.world):
        cached = cache.take(idx) if cache is not None else None  # every anchor's features of the batch, gathered once
        for a, v in enumerate(family):
            feats, logits = (cached[v.name], None) if cached is not None else anchor_features(v, x, task)
            correct[v.name] += torch.stack([task.quality(task.predict(lg, y)[0], y).double().sum()
                                            for lg in nets[v.name](feats)])  # per probe: [B, outputs] logits
            heads[a] += (cache.head_quality[v.name][idx].sum() if cache is not None else
                         task.quality(task.predict(logits, y)[0], y).double().sum())
    kd.all_reduce_([*correct.values(), heads], "probe evaluation")
    head = {v.name: float(heads[a]) for a, v in enumerate(family)}
    n = max(len(data), 1)
    return ({a: [round(100.0 * float(c) / n, 3) for c in cs] for a, cs in correct.items()},
            {a: round(100.0 * c / n, 3) for a, c in head.items()})


def _batches(data, batch_size: int, cache: FeatureCache | None, shuffle: bool = False, gen=None, rank: int = 0,
             world: int = 1):
    """(indices, inputs, targets) of every batch of ``data`` in ``klas.data.batches``' order (the same draws from
    ``gen``). Without a ``cache``: the inputs, indices None; with one: the indices, inputs None (the caller takes
    the cached features of the indices; nothing is read or decoded)."""
    if cache is None:
        for x, y in batches(data, batch_size, shuffle=shuffle, gen=gen, rank=rank, world_size=world):
            yield None, x, y
        return
    _, plan = batch_plan(len(data), batch_size, shuffle, gen, rank=rank, world_size=world)
    for idx in plan:
        yield idx, None, data.labels[idx]


def probe_trainer(nets: dict[str, ProbeNet], cfg: ProbesConfig, steps_per_epoch: int) -> Trainer:
    """AdamW over every probe (one group: ``cfg.weight_decay`` on all) with cosine decay to zero over the run and no
    warm-up or clipping (clipping the global norm would couple the probes)."""
    return Trainer(_ProbeBank(nets), lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=cfg.epochs * steps_per_epoch)


def train_probe_nets(family: Family, train: ImageSet, cfg: ProbesConfig, seed: int,
                     nets: dict[str, ProbeNet] | None = None, trainer: Trainer | None = None,
                     val: ImageSet | None = None, on_epoch=None, progress: bool = True, task=None,
                     train_cache: FeatureCache | None = None, val_cache: FeatureCache | None = None
                     ) -> dict[str, ProbeNet]:
    """The ProbeNet loop: per batch, one frozen forward per anchor feeds all its probes; summed loss, one backward.

    Under torchrun each rank runs its shard of every global batch through a DDP wrapper over the probes (the anchors
    are frozen replicas, outside DDP). ``trainer``: the ``probe_trainer`` of ``nets`` to continue (a resumed one
    starts at the epoch its step count reaches); ``on_epoch(epoch, nets, trainer, train_loss, val_acc, head_acc,
    wall_s)`` is called after every epoch (checkpointing). ``train_cache`` / ``val_cache``: the splits' cached
    features (``FeatureCache``), read instead of running the anchors; the probes come out the same.
    """
    task = task if task is not None else task_of(family)
    for v in family:
        v.eval()
    if nets is None:
        nets = task.new_probes(family, train, cfg, seed)
    steps = num_batches(train, cfg.batch_size)
    tr = trainer if trainer is not None else probe_trainer(nets, cfg, steps)
    di = kd.info()
    bank = tr.model
    model = bank
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        bank.to(di.device)
        model = DDP(bank, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    for epoch in range(tr.step // steps, cfg.epochs):  # checkpoints are written at epoch ends
        t0 = time.time()
        it = _batches(train, cfg.batch_size, train_cache, shuffle=True, gen=epoch_generator(seed, epoch),
                      rank=di.rank, world=di.world)
        bar = progress_bar(it, total=steps, desc=f"probes epoch {epoch + 1}/{cfg.epochs}", enabled=progress)
        loss_sum = 0.0
        for k, (idx, x, y) in enumerate(bar):
            # this rank's shard of global batch k: the global batch size is known from the split, not the shard
            global_b = min(cfg.batch_size, len(train) - k * cfg.batch_size)
            feats = train_cache.take(idx) if train_cache is not None else \
                {v.name: anchor_features(v, x, task)[0] for v in family}
            logits = model(feats)  # {anchor: [depth, B_shard, classes]}
            # sum over probes of each probe's mean loss over the GLOBAL batch: gradients stay per-probe;
            # x world because DDP averages over ranks
            loss = sum(task.probe_objective(nets[name], lg, feats[name], y)
                       for name, lg in logits.items()) * (di.world / global_b)
            try:
                loss.backward()
            except RuntimeError as e:
                if di.distributed:
                    raise kd.peer_failure(e, "probe gradient all_reduce") from None
                raise
            tr.update()
            loss_sum += loss.item() / di.world
        bar.close()
        if di.distributed:
            t = torch.tensor([loss_sum], dtype=torch.float64)
            kd.all_reduce_([t], "probe loss")
            loss_sum = float(t)
        probes_total = sum(n.depth for n in nets.values())
        train_loss = loss_sum / max(steps, 1) / max(probes_total, 1)
        val_acc, head_acc = evaluate_probes(family, nets, val, cfg.eval_batch_size, task=task, cache=val_cache) \
            if val is not None else ({}, {})
        if on_epoch is not None:
            on_epoch(epoch, nets, tr, train_loss, val_acc, head_acc, time.time() - t0)
    return nets


class _ProbeBank(nn.Module):
    """All anchors' ProbeNets as one module, so DDP sees every probe parameter (all are used every step)."""

    def __init__(self, nets: dict[str, ProbeNet]):
        super().__init__()
        self.nets = nn.ModuleDict({str(i): n for i, n in enumerate(nets.values())})
        self.names = list(nets)

    def forward(self, feats: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {name: self.nets[str(i)](feats[name]) for i, name in enumerate(self.names)}


def linear_probes(family: Family, train, cfg: ProbesConfig, seed: int, task) -> dict[str, ProbeNet]:
    """Fresh probes for every anchor, their feature standardization measured on the first ``cfg.stat_samples``
    training samples of the fixed split order (deterministic)."""
    nets = {v.name: ProbeNet(v.name, v.widths, task.num_outputs(family), seed) for v in family}
    for v in family:
        nets[v.name].set_stats(feature_stats(v, train, cfg.stat_samples, task=task))
    return nets


def run(cfg: ProbesConfig, ctx: StageContext) -> ProbesArtifact:
    """Train the probes of every anchor of ``ctx.family`` into ``<run>/probes``; resumed from ``checkpoint.pt`` after
    an interruption when the checkpoint was made under the same stage key (``klas.pipeline``)."""
    di = ctx.dist
    family, task, seed = ctx.family, ctx.task, ctx.seed
    out = ctx.folder("probes")
    inputs = dict(key=ctx.key, anchors={v.name: weights_digest(v) for v in family}, config=asdict(cfg), seed=seed)
    train = ctx.split("train").subset(cfg.train_subset)
    val = ctx.split("val").subset(cfg.val_subset)
    nets = task.new_probes(family, train, cfg, seed)
    # parameter-free probes (the logit lens) have nothing to train: evaluated once
    trainable = any(p.requires_grad for n in nets.values() for p in n.parameters())
    tr = probe_trainer(nets, cfg, num_batches(train, cfg.batch_size)) if trainable else None
    state = dict(epoch=0, history=[], wall_s=0.0)
    ckpt_path = out / CHECKPOINT
    if trainable and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if tr.matches(ck, inputs):
            tr.load_state_dict(ck)
            state = ck["state"]
            if di.is_main:
                print(f"[probe] resuming after epoch {state['epoch']}/{cfg.epochs}", flush=True)
        elif di.is_main:
            print(f"[probe] {ckpt_path}: made for other inputs, starting over", flush=True)

    def on_epoch(epoch, nets_, tr_, train_loss, val_acc, head_acc, wall):
        state["epoch"] = epoch + 1
        state["wall_s"] += wall
        state["history"].append(dict(epoch=epoch + 1, train_loss=round(train_loss, 5), wall_s=round(wall, 2),
                                     val_acc=val_acc, head_val_acc=head_acc))
        mean_acc = {a: round(sum(v) / len(v), 2) for a, v in val_acc.items()}
        if di.is_main:
            print(f"[probe] epoch {epoch + 1}/{cfg.epochs}: loss {train_loss:.4f}, mean probe val {task.metric} "
                  f"{mean_acc} ({wall:.0f}s)", flush=True)
            if tr_ is not None:
                tr_.save(ckpt_path, resume_tag=inputs, state=state)
        kd.barrier("probe checkpoint")

    caches = {}
    if cfg.feature_cache != "off" and state["epoch"] < cfg.epochs:
        for name, split, bs in (("train", train, cfg.batch_size), ("val", val, cfg.eval_batch_size)):
            caches[name] = FeatureCache(family, split, task, batch_size=bs, mode=cfg.feature_cache,
                                        limit_mb=cfg.cache_mb, folder=out, tag=name, progress=ctx.progress)
    try:
        if trainable:
            train_probe_nets(family, train, cfg, seed, nets, tr, val, on_epoch, ctx.progress, task=task,
                             train_cache=caches.get("train"), val_cache=caches.get("val"))
        else:
            t0 = time.time()
            val_acc, head_acc = evaluate_probes(family, nets, val, cfg.eval_batch_size, task=task,
                                                cache=caches.get("val"))
            on_epoch(cfg.epochs - 1, nets, None, 0.0, val_acc, head_acc, time.time() - t0)
    finally:
        for c in caches.values():
            c.close()
    tensors = {f"{name}/{k}.{p}": t for name, n in nets.items()
               for k, (w, b) in enumerate(n.folded()) for p, t in (("weight", w), ("bias", b))}
    art = ProbesArtifact(**_record(family, ctx.dataset, cfg, state, len(train), len(val)), world_size=di.world)
    if di.is_main:
        save_tensors(tensors, out / PROBES_FILE, metadata={"family": family.name, "format": "klas-probes-v1"})
        plot_probe_accuracy(asdict(art), out / PROBES_PNG)
        art.save(out)
    kd.barrier("probe artifacts")
    return art


def _record(family: Family, dataset: str, cfg: ProbesConfig, state: dict, n_train: int, n_val: int) -> dict:
    from klas_runtime.machine import machine_info

    hist = state["history"]
    final = hist[-1]["val_acc"] if hist else {}
    # epochs until a probe is within 1 point of its final accuracy (the paper reports convergence by epoch 4)
    converged = {a: [next(h["epoch"] for h in hist if h["val_acc"][a][k] >= acc - 1.0) for k, acc in enumerate(accs)]
                 for a, accs in final.items()}
    return dict(family=family.name, dataset=dataset, n_train=n_train, n_val=n_val, config=asdict(cfg),
                anchors=[dict(name=v.name, depth=v.depth, widths=v.widths, flops=v.flops) for v in family],
                history=hist, final_val_acc=final, epochs_to_within_1pt=converged,
                head_val_acc=hist[-1]["head_val_acc"] if hist else {}, wall_s=round(state["wall_s"], 2),
                machine=machine_info())


def plot_probe_accuracy(rec: dict, path: Path) -> None:
    """Validation accuracy vs epoch, one line per probe (colour = block depth), one panel per anchor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = [a["name"] for a in rec["anchors"]]
    fig, axes = plt.subplots(1, len(anchors), figsize=(4.2 * len(anchors), 3.6), squeeze=False, sharey=True)
    epochs = [h["epoch"] for h in rec["history"]]
    for ax, name in zip(axes[0], anchors):
        depth = len(rec["history"][0]["val_acc"][name]) if rec["history"] else 0
        cmap = plt.get_cmap("viridis")
        for k in range(depth):
            ax.plot(epochs, [h["val_acc"][name][k] for h in rec["history"]], marker=".",
                    color=cmap(k / max(depth - 1, 1)), label=f"block {k}" if k in (0, depth - 1) else None)
        if rec.get("head_val_acc"):
            ax.axhline(rec["head_val_acc"][name], color="k", ls="--", lw=1, label="anchor head")
        ax.set_title(name)
        ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("probe val accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_probes(run_dir: Path | str, family: Family) -> dict[str, ProbeNet]:
    """The trained probes of ``run_dir`` for ``family``'s anchors (one-line error when they do not fit)."""
    run = RunDir(run_dir, family.name)
    path = run.require("probes", PROBES_FILE, "`klas probe`")
    tensors = load_tensors(path)
    task = task_of(family)
    return {v.name: task.probes_from_tensors(family, v, tensors, str(path)).eval() for v in family}


def linear_probes_from_tensors(v: BlockView, num_outputs: int, tensors: dict, where: str) -> ProbeNet:
    """A ProbeNet of anchor ``v`` holding the folded probes ``<anchor>/<k>.weight|bias`` of a probes file."""
    net = ProbeNet(v.name, v.widths, num_outputs)
    sd = {}
    for k in range(v.depth):
        for p in ("weight", "bias"):
            key = f"{v.name}/{k}.{p}"
            if key not in tensors:
                raise KlasError(f"{where}: no probe {key} for anchor {v.name!r}; rerun `klas probe`")
            sd[f"probes.{k}.{p}"] = tensors[key]
        sd[f"shift_{k}"], sd[f"scale_{k}"] = torch.zeros(v.widths[k]), torch.ones(v.widths[k])  # folded
    try:
        net.load_state_dict(sd)
    except RuntimeError:
        raise KlasError(f"{where}: probe shapes of {v.name!r} do not match the anchor; rerun `klas probe`") from None
    return net


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "probes", ProbesConfig, ProbesArtifact, ()
DESCRIBE = "train one probe per block (ProbeNet: linear probes; lenses for language models)"


def summary(art: ProbesArtifact) -> dict:
    return dict(final_val_acc={a: accs[-1] for a, accs in art.final_val_acc.items()}, head_val_acc=art.head_val_acc)
