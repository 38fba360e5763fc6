"""The finetune stage: the selected stitches, by one of three recipes (``FinetuneConfig.recipe``):

* ``shared`` -- the stitched supernetwork (SN-Net, Pan et al., CVPR 2023): anchors shared by every selected
  configuration, one stitch layer per stitched configuration, one (or ``configs_per_step``) sampled configuration(s)
  trained per step; the anchors' learning rate can be a fraction of the stitch layers' (``anchor_lr_scale``).
* ``independent`` -- every selected stitch finetunes its own copy of the two anchors it uses (from the least-squares
  stitch layer), for ``epochs x steps_per_epoch`` steps each; the anchor configurations stay the untouched anchors.
* ``frozen`` -- the anchors stay frozen; every stitch trains only its stitch layer and low-rank adapters
  (``klas.stitch.LoRALinear``) on the target's Linear layers after the stitch, so each stitched model adds a few
  weights to the untouched anchors.

Any recipe can add distillation from an untouched, frozen anchor's outputs on the same batch (``distill``,
``distill_weight``, ``distill_temperature``). The anchors the family loaded are never trained by ``independent`` or
``frozen`` (deep copies are), nor used as teachers after training (teachers are copies made before it).

Determinism is by construction, so that a resumed run equals an uninterrupted one and every DDP rank agrees:

* the configuration of global step ``s`` is a pure function of (seed, s) (``config_at``); every rank computes the
  same one, so all ranks run the same sub-network and DDP reduces gradients of the same parameters;
* the data order of epoch ``e`` comes from a generator seeded by (seed, e); a resumed epoch replays its first
  batches without training on them (cheap: indexing + augmentation) to reach the same position;
* the learning rate is a closed form of the step (``klas.train.WarmupCosineLR``); weights, optimizer and schedule
  state, torch's global RNG and the history travel in the checkpoint (``klas.train.Trainer``).

The rest of this note is about ``shared``; ``independent`` / ``frozen`` train each stitch alone (on a CPU, ``workers``
forked processes at once) with the shared loop (data order, schedule, checkpoints), a checkpoint per stitch, its
weights in ``configs/<index>.safetensors``: a relaunch skips finished stitches and resumes the others at their step.

DDP: each step runs one configuration, so most parameters (other stitch layers, skipped blocks, other anchors) get
no gradient; the model is wrapped with ``find_unused_parameters=True`` (the used set is identical on every rank
because the sampled configuration is). Only rank 0 writes files. ``accum_steps`` splits each rank's shard of a
step's global batch into micro-batches (no gradient sync until the last): a memory knob that leaves the result
unchanged. ``parallel="fsdp"`` shards each stitch's network with FSDP2 instead (independent / frozen; large
anchors; CUDA or CPU -- see docs/scale-out.md). Collective failures (a dead or hung peer) end the job with a one-line
KlasError.

The stitched networks and their loaders live in ``klas.stitched``, the losses in ``klas.losses`` (the task's loss and
distillation term), the epoch loop in ``klas.train``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from tqdm import tqdm

from klas import distributed as kd
from klas.contract import Artifact, StageContext, digest, key_fields, setting
from klas.errors import KlasError
from klas.families import Family
from klas.io import load_checkpoint, load_json, load_tensors, save_tensors, tensor_metadata
from klas.metrics import network_score
from klas.losses import TeacherMemo, check_distill, distill_loss, frozen_teachers, teacher_name
from klas.stages.s3_selection import SelectionArtifact
from klas.stitch import FitCfg, StitchConfig, fit_stitch
from klas.stitched import (ANCHORS, CKPT_DIR, CONFIG_DIR, INIT_STITCHES, RECORD, STITCHES, SUPERNET_CKPT,
                           StitchedModels, limit_stitches, read_selection, remove_stale_stitch_files, set_train_mode,
                           stitch_tensors_to_save, trainable_stitch)
from klas.workers import run_forked, worker_count
from klas.train import (LoopState, Trainer, config_at, data_parallel, derive_seed, load_training, plot_training,
                        progress_bar, rest_of_epoch, run_epochs, save_training, unshard)

SAMPLING = ("balanced", "uniform")
PARALLEL = ("ddp", "fsdp")
RECIPES = ("shared", "independent", "frozen")
TEACHER_MEMO_BYTES = 512 << 20  # per teacher: fmnist-deit's 55k x 10 logits are 2.2 MB


@dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning of the selected stitches: ``recipe`` shared (one SN-Net supernetwork, anchors shared by every
    configuration), independent (each stitch its own copy of its two anchors) or frozen (anchors frozen; stitch
    layer + LoRA on the target blocks after the stitch).

    Budget: ``epochs`` x ``steps_per_epoch`` steps of ``batch_size`` images -- shared by all configurations in the
    ``shared`` recipe (x ``configs_per_step`` forward/backward passes per step), and *per stitch* in the
    ``independent`` and ``frozen`` ones; the artifact records the samples seen in all (``images_seen``), the figure
    to hold equal when recipes are compared. ``sampling`` (shared): ``uniform`` draws a configuration per step
    i.i.d. (SN-Net); ``balanced`` walks seeded permutations of all configurations so each gets the same number of
    steps (+-1) under any budget -- fairer for short budgets. Under torchrun, ``accum_steps`` micro-batches per rank
    and step (same result, less memory) and ``parallel`` (ddp, or fsdp: FSDP2, not with shared) change memory and
    speed, not results.
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
    distill: str | None = setting("target", "distil from an untouched anchor's outputs: target (each configuration's "
                                  "target anchor), largest, or an anchor name", none="none")
    distill_weight: float = setting(0.5, "loss = (1 - w) task loss + w distillation (classes: T^2 KL(teacher || student))", ge=0, le=1)
    distill_temperature: float = setting(1.0, "softmax temperature T of the distillation term", gt=0)
    lora_rank: int = setting(4, "rank of the LoRA adapters (frozen)", ge=1)
    lora_alpha: float = setting(8.0, "LoRA scale alpha: the update is (alpha / rank) B A (frozen)", gt=0)
    amp: str = setting("auto", "bf16 autocast: auto = on CUDA only", choices=("auto", "bf16", "off"))
    ckpt_every: int = setting(0, "also checkpoint every K steps (0: at epoch ends only)", ge=0, key=False)
    accum_steps: int = setting(1, "micro-batches per rank and step (torchrun)", ge=1, key=False)
    parallel: str = setting("ddp", "data-parallel wrapper under torchrun", choices=PARALLEL, key=False)
    workers: int | None = setting(None, "stitches trained at once (independent / frozen, one CPU process): forked "
                                  "processes of one thread each", ge=1, none="auto", key=False)
    init: FitCfg = FitCfg()


@dataclass(frozen=True)
class FinetuneArtifact(Artifact):
    """``anchors.safetensors`` (shared: finetuned; independent / frozen: the untouched anchors) +
    ``stitch_layers.safetensors`` (finetuned), ``init_stitch_layers.safetensors`` (as initialised), for
    independent / frozen one ``configs/<index>.safetensors`` per stitched configuration (the tensors it trained), and
    this record: one row per configuration (key, config, flops, steps and images trained, teacher, weights file, val
    accuracy), the recipe and the images seen in all. The digest covers the per-configuration files too."""

    KIND: ClassVar[str] = "finetune"
    VERSION: ClassVar[int] = 3  # 2: recipes (recipe, images_seen, per-configuration weights); 3: finetune.json, task
    RECORD: ClassVar[str] = RECORD
    FILES: ClassVar[tuple[str, ...]] = (ANCHORS, STITCHES, INIT_STITCHES)
    recipe: str
    images_seen: int
    family: str
    num_classes: int | None
    task: str
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
            rec = load_json(Path(folder) / RECORD)
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


def _resume_tag(family: str, weights, configs: list[StitchConfig], cfg, seed: int) -> str:
    """What a checkpoint was made for (settings that change results, configurations, seed): a relaunch with other
    settings never resumes it. Whether the stage is *done* is the pipeline's decision, not this."""
    return digest(family, str(weights), [c.key for c in configs], key_fields(cfg), seed)


def _init_layers(net: StitchedModels, train, cfg: FinetuneConfig, seed: int, path: Path, fp: str, rank: int,
                 progress: bool) -> dict[int, dict]:
    """Fit every stitch layer (or reload the fit made before an interruption); returns per-config fit statistics."""
    meta = tensor_metadata(path) or {}  # none: no fit yet, or a torn file (fitted again)
    if meta.get("resume_tag") == fp:
        net.load_stitch_tensors(load_tensors(path), str(path))
        return {int(k): v for k, v in json.loads(meta["stats"]).items()}
    stats: dict[int, dict] = {}
    todo = [k for k, c in enumerate(net.configs) if not c.is_anchor]
    for k in tqdm(todo, desc=f"[finetune] init stitch layers ({cfg.init.method})", disable=not progress or rank != 0):
        c = net.configs[k]
        fit = replace(cfg.init, seed=derive_seed(seed, "init", k) & 0xFFFFFFFF)
        layer, st = fit_stitch(net.view(c.source), c.i, net.view(c.target), c.j, train, fit)
        net.stitches[str(k)].load_state_dict(layer.state_dict())
        stats[k] = st
    if rank == 0:
        save_tensors(net.stitch_tensors(), path, metadata=dict(resume_tag=fp, stats=json.dumps(stats)))
    return stats


@dataclass
class _Run:
    """What every recipe's loop reads: the settings, data, budget, device and hooks of this finetune run."""

    cfg: FinetuneConfig
    task: object
    seed: int
    train: object
    val: object
    spe: int
    total: int
    out: Path
    fp: str
    rank: int
    world: int
    device: torch.device
    use_amp: bool
    progress: bool
    restart: bool
    on_step: object
    teachers: dict

    def batches(self, step: int):
        return rest_of_epoch(step, self.spe, self.train, self.cfg.batch_size, self.cfg.augment, self.seed, self.rank,
                             self.world, self.device)

    def score(self, net: nn.Module, **kw) -> float:
        return network_score(self.task, net, self.val, sharded=True, **kw)

    def trainer(self, net: nn.Module, scale) -> Trainer:
        # warm-up over warmup_frac of the budget, cosine to min_lr; no decay on biases, norms, embeddings
        c = self.cfg
        return Trainer(net, lr=c.lr, weight_decay=c.weight_decay, total_steps=self.total,
                       warmup_steps=int(round(c.warmup_frac * self.total)), min_lr=c.min_lr, clip_grad=c.clip_grad,
                       no_decay=True, lr_scale=scale)

    def barrier(self) -> None:
        if self.world > 1:
            kd.barrier("finetune checkpoint barrier")


def run(cfg: FinetuneConfig, ctx: StageContext) -> FinetuneArtifact:
    """Initialise the stitch layers and finetune the selected configurations by ``cfg.recipe``; resumable,
    DDP-ready.

    Writes ``<run>/finetune/``: ``init_stitch_layers.safetensors`` (stitch layers before finetuning),
    ``stitch_layers.safetensors`` (finetuned) and ``anchors.safetensors`` (shared: the finetuned anchors;
    independent / frozen: the untouched ones), ``finetune.json`` (the artifact record) and ``training.png``; shared:
    ``supernet.ckpt`` (training state: every epoch and every ``cfg.ckpt_every`` steps); independent / frozen:
    ``configs/<index>.safetensors`` (each stitch's trained tensors, written when it finishes) and
    ``checkpoints/<index>.ckpt`` (the stitch in training, at the same cadence; removed when it finishes).

    Checkpoints made under these settings are resumed; others belong to a stale run of this stage (the pipeline
    re-runs it because its key changed) and are discarded, unless ``ctx.hooks["restart"]`` is False, which refuses
    to touch them. ``ctx.hooks["on_step"]``: called with the global step after each optimizer step (a test hook:
    raising there simulates a crash between checkpoints); independent / frozen count steps over the stitches in
    training order. The family (``ctx.family``) is trained in place by the shared recipe, never by the others.
    """
    di = ctx.dist
    rank, world = di.rank, di.world
    out = ctx.folder("finetune")
    fam, task = ctx.family, ctx.task
    sel = ctx.upstream(SelectionArtifact)
    sel_path = ctx.folder_of(SelectionArtifact) / SelectionArtifact.RECORD
    configs = limit_stitches(read_selection(sel, fam, sel_path), cfg.max_stitches, fam)
    check_distill(cfg.distill, fam)
    weights = ctx.run.weights
    fp = _resume_tag(fam.name, weights, configs, cfg, ctx.seed)

    train = ctx.split("train", augment=cfg.augment).subset(cfg.train_subset)
    val = ctx.split("val").subset(cfg.val_images) if cfg.val_images else None
    spe = cfg.steps_per_epoch or (len(train) // cfg.batch_size)
    if spe < 1:
        raise KlasError(f"--batch-size {cfg.batch_size}: larger than the training set ({len(train)} samples)")
    kd.check_divisible(cfg.batch_size, world)
    if cfg.parallel == "fsdp" and cfg.recipe == "shared":
        raise KlasError("finetune.parallel = fsdp: not with finetune.recipe = shared (its supernetwork is the family's "
                        "own anchors, which FSDP2 would shard in place for the rest of the run, and each "
                        "configuration runs outside the sharded root's forward); use finetune.recipe = independent "
                        "or frozen, or finetune.parallel = ddp")
    total = cfg.epochs * spe

    device = di.device
    trained = [k for k, c in enumerate(configs) if cfg.recipe == "shared" or not c.is_anchor]
    teacher_of = {k: teacher_name(configs[k], cfg.distill, fam) for k in trained}
    # NOTE: copies of the untouched anchors, made before anything trains (shared trains the family's in place)
    teachers = frozen_teachers(fam, {t for t in teacher_of.values() if t is not None}, device)
    torch.manual_seed(ctx.seed)
    net = StitchedModels(fam, configs)
    init_stats = _init_layers(net, train, cfg, ctx.seed, out / INIT_STITCHES,
                              _resume_tag(fam.name, weights, configs, cfg.init, ctx.seed), rank, ctx.progress)
    env = _Run(cfg=cfg, task=task, seed=ctx.seed, train=train, val=val, spe=spe, total=total, out=out, fp=fp,
               rank=rank, world=world, device=device,
               use_amp=cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"), progress=ctx.progress,
               restart=ctx.hooks.get("restart", True), on_step=ctx.hooks.get("on_step"),
               teachers={k: teachers[t] if t is not None else None for k, t in teacher_of.items()})
    if cfg.recipe == "shared":
        state, val_final = _train_shared(net, env)
        weight_files = {}
    else:
        state, val_final, weight_files = _train_each(net, env)
    record = dict(weights=None if weights is None else str(weights), pretrained=ctx.prebuilt is None,
                  dataset=ctx.dataset, cfg=dict(asdict(cfg), seed=ctx.seed), steps=total, steps_per_epoch=spe,
                  world_size=world)
    art = FinetuneArtifact(**_summary(net, fam, task, sel, sel_path, record, state, init_stats, val_final, cfg,
                                      teacher_of, weight_files))
    if rank == 0:
        save_tensors(net.anchor_tensors(), out / ANCHORS, metadata=dict(family=fam.name, recipe=cfg.recipe))
        save_tensors(net.stitch_tensors(), out / STITCHES, metadata=dict(family=fam.name, recipe=cfg.recipe))
        art.save(out)
        plot_training(state.losses, out / "training.png", state.curves)
        remove_stale_stitch_files(out, cfg.recipe, weight_files)
    env.barrier()
    return art


def _resume_or_refuse(path: Path, ck, tag: str, restart: bool):
    """The checkpoint ``ck`` when it was made for ``tag``; None when it was not and ``restart`` allows discarding
    it; otherwise a one-line refusal."""
    if ck is None or Trainer.matches(ck, tag):
        return ck
    if restart:
        return None
    raise KlasError(f"{path}: checkpoint was made with other settings, another selection or an older klas; delete "
                    f"it (or pass --restart) to start over")


def _train_shared(net: StitchedModels, env: _Run) -> tuple[LoopState, list | None]:
    """The SN-Net loop: ``configs_per_step`` sampled configurations per step (each on the step's batch, gradients
    summed), the shared anchors at ``anchor_lr_scale`` x the stitch layers' learning rate. Returns (state, val
    score of every configuration after training)."""
    cfg, n, per = env.cfg, len(net.configs), env.cfg.configs_per_step
    path = env.out / SUPERNET_CKPT
    ck = _resume_or_refuse(path, load_checkpoint(path) if path.is_file() else None, env.fp, env.restart)
    state = LoopState(counts=[0] * n)
    if env.val is not None and ck is None:
        state.val_init = [env.score(net.net(k)) for k in range(n)]
    net.to(env.device)
    scale = None if cfg.anchor_lr_scale == 1.0 else (
        lambda name: 1.0 if name.startswith("stitches.") else cfg.anchor_lr_scale)
    tr = env.trainer(net, scale)
    if ck is not None:
        tr.load_state_dict(ck)
        state = LoopState.from_dict(ck["state"])
        if env.rank == 0 and env.progress:
            print(f"[supernet] resuming at step {tr.step}/{env.total}", flush=True)
    model = data_parallel(net, cfg.parallel, env.device) if env.world > 1 else net

    def save_ckpt() -> None:
        if env.rank == 0:
            tr.save(path, resume_tag=env.fp, state=state.as_dict())
        env.barrier()

    def step(batch):
        x, y = batch
        ks = [config_at(tr.step * per + m, n, env.seed, cfg.sampling) for m in range(per)]
        losses = [_accumulate(model, x, y, k, env, env.teachers.get(k)) for k in ks]
        for k in ks:
            state.counts[k] += 1
        return (losses[0] if per == 1 else torch.stack(losses).mean()), (ks[0] if per == 1 else ",".join(map(str, ks)))

    bar = progress_bar(total=env.total, initial=tr.step, desc=f"[supernet] finetune {n} configs",
                       enabled=env.progress, file=sys.stderr, leave=True)
    net.train()
    run_epochs(tr, state, total=env.total, steps_per_epoch=env.spe, epoch_batches=env.batches, step=step, bar=bar,
               save=save_ckpt, ckpt_every=cfg.ckpt_every, on_step=env.on_step)
    bar.close()
    net.eval()
    val_final = [env.score(net.net(k), device=env.device) for k in range(n)] if env.val else None
    net.cpu()
    return state, val_final


def _train_each(net: StitchedModels, env: _Run) -> tuple[LoopState, list | None, dict[int, str]]:
    """The independent / frozen loop: every stitched configuration in selection order, each its own network
    (``trainable_stitch``: copies of the untouched anchors, its least-squares stitch layer) trained for the whole
    budget with the loop, schedule and data order of the shared recipe; its trained tensors go to
    ``configs/<k>.safetensors`` (with its history and val score in the metadata) when it finishes, so a relaunch
    skips it. Anchor configurations are the untouched anchors. Returns (state, val score per configuration,
    {k: weights file relative to the stage folder})."""
    out, n = env.out, len(net.configs)
    todo = [k for k, c in enumerate(net.configs) if not c.is_anchor]
    if env.rank == 0:
        (out / CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    env.barrier()
    val_init = [env.score(net.net(k)) for k in range(n)] if env.val is not None else None
    bar = progress_bar(total=len(todo) * env.total, desc=f"[{env.cfg.recipe}] finetune {len(todo)} stitches",
                       enabled=env.progress, file=sys.stderr, leave=True)
    files = {k: f"{CONFIG_DIR}/{k}.safetensors" for k in todo}
    tags = {k: digest(env.fp, "stitch", k) for k in todo}
    results = {}
    for k in todo:  # finished stitches (a relaunch): their records
        meta = tensor_metadata(out / files[k])
        if meta is not None and meta.get("resume_tag") != tags[k]:
            if not env.restart:
                raise KlasError(f"{out / files[k]}: made with other settings, another selection or an older klas; "
                                f"delete {out / CONFIG_DIR} (or pass --restart) to start over")
            meta = None
        if meta is not None:
            results[k] = json.loads(meta["state"])
            bar.update(env.total)
    pending = [k for k in todo if k not in results]
    workers = _workers(net, pending, env)
    # NOTE: a memo per teacher, shared by its stitches (TeacherMemo); in workers one reader: the next may run elsewhere
    teachers = {k: env.teachers.get(k) for k in pending}
    memos = {id(t): TeacherMemo(t, sum(u is t for u in teachers.values()) if workers == 1 else 1, TEACHER_MEMO_BYTES)
             for t in teachers.values() if t is not None}
    memo_of = {k: memos[id(t)] for k, t in teachers.items() if t is not None}

    def train(k: int, progress) -> dict:
        rec = _train_stitch(net, k, todo.index(k), tags[k], out / files[k], env, progress, memo_of.get(k))
        if k in memo_of:
            memo_of[k].release()
        return rec

    if workers > 1:  # the costliest first (forward + backward + its teacher's forward), so the loads even out
        order = sorted(pending, key=lambda k: -(3 * net.net(k).flops + getattr(env.teachers.get(k), "flops", 0)))
        results.update(run_forked(train, order, workers, bar, what="stitch"))
    else:
        results.update({k: train(k, bar) for k in pending})
    bar.close()
    # the trained stitch layers also go to stitch_layers.safetensors (the shared recipe's layout)
    for k in todo:
        layer = {key[len("layer."):]: t for key, t in load_tensors(out / files[k]).items() if key.startswith("layer.")}
        net.stitches[str(k)].load_state_dict(layer)
    counts = [0] * n
    for k in todo:
        counts[k] = results[k]["steps"]
    state = LoopState(counts=counts, val_init=val_init, wall_s=sum(results[k]["wall_s"] for k in todo),
                      history=[dict(config=k, **h) for k in todo for h in results[k]["history"]],
                      losses=[v for k in todo for v in results[k]["losses"]],
                      curves={net.configs[k].key: results[k]["losses"] for k in todo})
    val_final = None
    if env.val is not None:
        val_final = [results[k]["val_acc"] if k in results else val_init[k] for k in range(n)]
    return state, val_final, files


def _workers(net: StitchedModels, pending: list[int], env: _Run) -> int:
    """Processes that train the pending stitches (``klas.workers``): one where several ranks, a GPU or test hooks
    run the loop, else ``cfg.workers`` (auto: one per core) as memory allows -- each worker holds its stitch's two
    anchor copies with their gradients and AdamW moments (~24 bytes a parameter with the activations)."""
    if env.world > 1 or env.device.type != "cpu" or env.on_step is not None or len(pending) < 2:
        return 1
    return worker_count(len(pending), env.cfg.workers, job_bytes=24 * max(net.anchor_params(k) for k in pending))


def _train_stitch(net: StitchedModels, k: int, pos: int, tag: str, path: Path, env: _Run, bar,
                  teacher: TeacherMemo | None) -> dict:
    """Train stitched configuration ``k`` alone (resuming its checkpoint when one was made with ``tag``), save its
    tensors to ``path``; returns its record (steps, history, losses, wall time, val score). ``teacher``: its
    teacher's memo (None: no distillation)."""
    cfg, c = env.cfg, net.configs[k]
    ck_path = env.out / CKPT_DIR / f"{k}.ckpt"
    ck = _resume_or_refuse(ck_path, load_checkpoint(ck_path) if ck_path.is_file() else None, tag, env.restart)
    # NOTE: every stitch starts from its own seed, so it does not depend on which stitches ran before it
    torch.manual_seed(derive_seed(env.seed, "stitch", k))

    def build() -> nn.Module:
        return trainable_stitch(net.view(c.source), net.view(c.target), c, net.stitches[str(k)], cfg.recipe,
                                cfg.lora_rank, cfg.lora_alpha,
                                torch.Generator().manual_seed(derive_seed(env.seed, "lora", k)))

    sn = build()
    sharded = env.world > 1 and cfg.parallel == "fsdp"
    if not sharded:
        sn.to(env.device)  # FSDP2 moves each unit's shards there as it shards it
    scale = None if cfg.anchor_lr_scale == 1.0 or cfg.recipe == "frozen" else (
        lambda name: 1.0 if name.startswith("layer.") else cfg.anchor_lr_scale)
    # NOTE: the wrapper before the optimizer: FSDP2 replaces sn's parameters by sharded DTensors in place
    model = data_parallel(sn, cfg.parallel, env.device) if env.world > 1 else sn
    tr = env.trainer(sn, scale)
    state = LoopState()
    if ck is not None:
        load_training(tr, ck)
        state = LoopState.from_dict(ck["state"])
        if env.rank == 0 and env.progress:
            print(f"[{cfg.recipe}] {c.key}: resuming at step {tr.step}/{env.total}", flush=True)
    bar.update(tr.step)

    def save_ckpt() -> None:
        save_training(tr, ck_path, env.rank, resume_tag=tag, state=state.as_dict())  # FSDP2: every rank gathers
        env.barrier()

    def step(batch):
        x, y = batch
        return _accumulate(model, x, y, None, env, teacher, key=tr.step if teacher is not None else None), k

    set_train_mode(sn, cfg.recipe)
    on_step = None if env.on_step is None else (lambda s: env.on_step(pos * env.total + s))
    run_epochs(tr, state, total=env.total, steps_per_epoch=env.spe, epoch_batches=env.batches, step=step, bar=bar,
               save=save_ckpt, ckpt_every=cfg.ckpt_every, on_step=on_step)
    if sharded:  # score and save an ordinary network holding the trained weights (gathered on every rank)
        sn = unshard(model, build()).to(env.device)
    sn.eval()
    rec = dict(history=state.history, losses=state.losses, wall_s=state.wall_s, steps=tr.step,
               val_acc=env.score(sn, device=env.device) if env.val else None)
    sn.cpu()
    if env.rank == 0:
        save_tensors(stitch_tensors_to_save(sn, cfg.recipe), path,
                     metadata=dict(resume_tag=tag, config=c.key, recipe=cfg.recipe, state=json.dumps(rec)))
        ck_path.unlink(missing_ok=True)
    env.barrier()
    return rec


def _accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int | None, env: _Run,
                teacher: nn.Module | None = None, key: int | None = None) -> torch.Tensor:
    """Forward + backward of configuration ``k`` (None: ``model`` is one standalone network) on this rank's shard in
    ``accum_steps`` micro-batches, each loss weighted by its share of the shard (so the gradient is the shard mean,
    as in one pass); gradients are only synchronised on the last micro-batch. ``teacher``: the frozen network whose
    outputs on the same inputs are distilled (``klas.losses.distill_loss``); with ``key`` (the step) it is a
    ``TeacherMemo``, asked per (step, micro-batch). Returns the shard's mean loss. A failed
    collective becomes a KlasError."""
    from contextlib import nullcontext

    cfg = env.cfg
    parts = [p for p in zip(x.tensor_split(cfg.accum_steps), y.tensor_split(cfg.accum_steps)) if len(p[1])]
    total = torch.zeros((), device=x.device)
    try:
        for m, (xm, ym) in enumerate(parts):
            sync = m == len(parts) - 1 or env.world == 1 or not hasattr(model, "no_sync")
            with (nullcontext() if sync else model.no_sync()):
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.use_amp):
                    logits = model(xm, k) if k is not None else model(xm)
                    with torch.no_grad():
                        t_logits = None if teacher is None else teacher(xm) if key is None else teacher(
                            xm, key=(key, m))
                loss = distill_loss(env.task, logits, ym, t_logits, label_smoothing=cfg.label_smoothing,
                                    weight=cfg.distill_weight, temperature=cfg.distill_temperature) * (len(ym) / len(y))
                loss.backward()
            total += loss.detach()
    except RuntimeError as e:
        if env.world > 1:
            raise kd.peer_failure(e, "finetune gradient all_reduce") from None
        raise
    return total


def _summary(net: StitchedModels, fam: Family, task, sel: SelectionArtifact, sel_path: Path, record: dict,
             state: LoopState, init_stats: dict, val_final, cfg: FinetuneConfig, teacher_of: dict,
             weight_files: dict) -> dict:
    from klas_runtime.machine import machine_info

    views = {v.name: v for v in fam}
    rows = []
    for k, c in enumerate(net.configs):
        rows.append(dict(index=k, key=c.key, config=c.to_dict(), anchor=c.is_anchor, flops=net.net(k).flops,
                         stitch=None if c.is_anchor else str(k), init=init_stats.get(k), samples=state.counts[k],
                         images=state.counts[k] * cfg.batch_size, teacher=teacher_of.get(k),
                         trained=state.counts[k] > 0, weights=weight_files.get(k),
                         val_acc_init=None if state.val_init is None else state.val_init[k],
                         val_acc=None if val_final is None else val_final[k]))
    any_view = next(iter(views.values()))
    if cfg.recipe == "shared":
        files = dict(checkpoint=SUPERNET_CKPT, anchors=ANCHORS, stitch_layers=STITCHES,
                     init_stitch_layers=INIT_STITCHES)
    else:
        files = dict(checkpoints=CKPT_DIR, anchors=ANCHORS, anchors_state="untouched", stitch_layers=STITCHES,
                     init_stitch_layers=INIT_STITCHES, configs=CONFIG_DIR)
    return dict(
        recipe=cfg.recipe, images_seen=sum(r["images"] for r in rows), family=fam.name, task=task.name,
        num_classes=int(getattr(any_view.model, "num_classes", 0)) or None,
        input_shape=list(any_view.input_shape), anchor_flops={n: v.flops for n, v in views.items()},
        selection=dict(path=str(sel_path), method=sel.method, n_selected=len(sel.selected),
                       n_finetuned=sum(not c.is_anchor for c in net.configs)),
        **record, wall_s=round(state.wall_s, 2), history=state.history, configs=rows, files=files,
        machine=machine_info())


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "finetune", FinetuneConfig, FinetuneArtifact, ("selection",)
DESCRIBE = "least-squares stitch init + finetuning (recipe: shared supernetwork, independent, frozen + LoRA)"


def summary(art: FinetuneArtifact) -> dict:
    return dict(recipe=art.recipe, configurations=len(art.configs), steps=art.steps, images_seen=art.images_seen,
                wall_s=art.wall_s)
