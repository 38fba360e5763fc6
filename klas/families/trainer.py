"""The embedded anchor zoo: reproducible training of a family's anchors from scratch, and its model card.

``klas anchors train fmnist-deit`` trains every anchor with one recipe (same epochs, optimizer, schedule, augmentation,
seed), checkpoints each epoch (resumable), and writes ``<anchor>.safetensors`` plus the family's card
(``card_file``).
"""
from __future__ import annotations

import json

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from klas.data import batches, load_dataset, num_batches
from klas.contract import overrides, setting
from klas.errors import KlasError
from klas.families._registry import _EMBEDDED_WEIGHTS, create_anchor, get_family_cfg, list_families
from klas.io import load_checkpoint, load_json, save_json, save_tensors, sha256_file
from klas.train import AdamWSettings, Trainer, epoch_generator, progress_bar
from klas_runtime.machine import machine_info


@dataclass(frozen=True)
@overrides(epochs=20, lr=2e-3, weight_decay=0.05)
class Recipe(AdamWSettings):
    """One training recipe for every anchor of a family (a spread made by undertraining one anchor is not real)."""

    warmup_epochs: float = setting(1.0, "linear warm-up, in epochs", ge=0)
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy", ge=0, le=1)
    seed: int = setting(0, "seed of the initialisation and the data order", ge=0)
    train_subset: int | None = setting(None, "first N training images only (tests, smoke runs)", ge=1, none="all")


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data, batch_size: int = 1000) -> float:
    """Top-1 accuracy (percent) of ``model`` on an ImageSet (left in eval mode)."""
    from klas.metrics import network_score
    from klas.tasks import get_task

    model.eval()
    return network_score(get_task("image-classification"), model, data, batch_size)


def train_anchor(family: str, anchor_name: str, out_dir: Path, recipe: Recipe = Recipe(),
                 data_root: Path | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train one anchor from scratch with ``recipe``; resumable from ``out_dir/<anchor>.ckpt``.

    ``stop_after_epoch`` simulates an interruption (KeyboardInterrupt once that epoch's checkpoint is written).
    """
    cfg = get_family_cfg(family)
    anchor = next((a for a in cfg.anchors if a.name == anchor_name), None)
    if anchor is None:
        raise KlasError(f"family {family}: no anchor {anchor_name!r}")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / f"{anchor.name}.ckpt"
    torch.manual_seed(recipe.seed)
    view = create_anchor(anchor, cfg.input_shape, pretrained=False)
    model = view.model
    train = load_dataset(cfg.dataset, "train", data_root).subset(recipe.train_subset)
    val = load_dataset(cfg.dataset, "val", data_root)
    # the recipe of the shipped weights: AdamW decaying every parameter, warm-up then cosine to 0, grad norm <= 1
    # NOTE: the anchor's architecture is part of the tag: a checkpoint of a differently shaped model is refused
    tag = dict(asdict(recipe), arch=anchor.arch, model_args=json.loads(json.dumps(anchor.model_args)))
    state = fit(model, train, val, recipe, ckpt_path, anchor.name, resume_tag=tag, stop_after_epoch=stop_after_epoch)
    test = load_dataset(cfg.dataset, "test", data_root)
    weights = out_dir / anchor.embedded_file if anchor.embedded_file else out_dir / f"{anchor.name}.safetensors"
    save_tensors(model.state_dict(), weights, metadata={"family": family, "anchor": anchor.name})
    entry = dict(name=anchor.name, arch=anchor.arch, model_args=anchor.model_args, params=view.num_params,
                 flops=view.flops, test_acc=evaluate_accuracy(model, test), val_acc=state["history"][-1]["val_acc"],
                 history=state["history"], train_wall_s=round(state["wall_s"], 1), file=weights.name,
                 sha256=sha256_file(weights))
    return entry


def fit(model: torch.nn.Module, train, val, recipe: Recipe, ckpt_path: Path, name: str, *, resume_tag,
        no_decay: bool = False, ckpt_every: int | None = None, stop_after_epoch: int | None = None,
        on_step=None, log: str = "zoo", progress: bool = True, task=None, eval_batch: int = 1000) -> dict:
    """The one supervised loop of ``recipe`` (AdamW through ``klas.train.Trainer``, warm-up then cosine to 0, grad
    norm <= 1, cross-entropy with label smoothing, the data order and augmentation of ``epoch_generator``), resumable
    exactly from ``ckpt_path``: written at every epoch end and, with ``ckpt_every``, every that many steps within an
    epoch (a resumed epoch replays its data order up to the step, without training, so the batches and the
    augmentation are those of the uninterrupted run). ``resume_tag``: what the checkpoint must have been made for.
    Returns the loop's state: ``epoch``, ``history`` (per epoch: train loss, val accuracy), ``wall_s``. ``task``:
    the task whose loss and metric are used (default: image classification).

    ``stop_after_epoch`` simulates an interruption (KeyboardInterrupt once that epoch's checkpoint is written);
    ``on_step(step)`` is called after every optimizer step (tests kill the process there)."""
    from klas.metrics import network_score
    from klas.tasks import get_task

    task = task or get_task("image-classification")
    steps_per_epoch = num_batches(train, recipe.batch_size, drop_last=True)
    if steps_per_epoch < 1:
        raise KlasError(f"{name}: {len(train)} training images make no batch of {recipe.batch_size}; lower "
                        f"--batch-size")
    tr = Trainer(model, lr=recipe.lr, weight_decay=recipe.weight_decay, total_steps=recipe.epochs * steps_per_epoch,
                 warmup_steps=int(recipe.warmup_epochs * steps_per_epoch), clip_grad=1.0, no_decay=no_decay)
    state = dict(epoch=0, history=[], wall_s=0.0)
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if not tr.matches(ck, resume_tag):
            raise KlasError(f"{ckpt_path}: checkpoint was made with another recipe, another architecture or an older "
                            f"klas; delete it to start over")
        tr.load_state_dict(ck)
        state = ck["state"]
        print(f"[{log}] {name}: resuming after step {tr.step} (epoch {state['epoch']})", flush=True)
    for epoch in range(tr.step // steps_per_epoch, recipe.epochs):  # checkpoints: epoch ends (and every ckpt_every)
        t0 = time.time()
        model.train()
        skip = tr.step - epoch * steps_per_epoch  # steps of this epoch already taken (a mid-epoch checkpoint)
        loss_sum = state.get("epoch_loss", 0.0) if skip else 0.0
        it = batches(train, recipe.batch_size, shuffle=True, gen=epoch_generator(recipe.seed, epoch),
                     train_augment=True, drop_last=True)
        bar = progress_bar(it, total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{recipe.epochs}",
                           mininterval=5, enabled=progress)
        for k, (x, y) in enumerate(bar):
            if k < skip:  # replayed: the generator's draws (order, augmentation) advance as in the first run
                continue
            loss = task.loss(model(x), y, label_smoothing=recipe.label_smoothing)
            loss.backward()
            tr.update()
            loss_sum += loss.item()
            if ckpt_every and tr.step % ckpt_every == 0 and k + 1 < steps_per_epoch:
                tr.save(ckpt_path, resume_tag=resume_tag,
                        state=dict(state, epoch_loss=loss_sum, wall_s=state["wall_s"] + time.time() - t0))
            if on_step is not None:
                on_step(tr.step)
        model.eval()
        val_acc = network_score(task, model, val, eval_batch)
        state = dict(state, epoch=epoch + 1, wall_s=state["wall_s"] + time.time() - t0, epoch_loss=0.0)
        state["history"] = state["history"] + [dict(epoch=epoch + 1, train_loss=loss_sum / steps_per_epoch,
                                                    val_acc=val_acc)]
        print(f"[{log}] {name} epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / steps_per_epoch:.4f} "
              f"val {val_acc:.2f}%  ({time.time() - t0:.0f}s)", flush=True)
        tr.save(ckpt_path, resume_tag=resume_tag, state=state)
        if stop_after_epoch is not None and epoch + 1 == stop_after_epoch:
            raise KeyboardInterrupt
    if not state["history"]:
        raise KlasError(f"{ckpt_path}: checkpoint is past the recipe's {recipe.epochs} epochs; delete it")
    return state


def train_family(family: str, out_dir: Path | None = None, recipe: Recipe = Recipe(), data_root: Path | None = None,
                 anchors: list[str] | None = None, threads: int | None = None) -> Path:
    """Train the anchors of ``family`` (default: all) and write/refresh ``card.json`` in ``out_dir``."""
    cfg = get_family_cfg(family)
    out_dir = Path(out_dir) if out_dir else _EMBEDDED_WEIGHTS
    if threads:
        torch.set_num_threads(threads)
    card_path = card_file(out_dir, family)
    card = load_json(card_path) if card_path.is_file() else {}
    entries = {e["name"]: e for e in card.get("anchors", [])}
    for a in cfg.anchors:
        if anchors and a.name not in anchors:
            continue
        entries[a.name] = train_anchor(family, a.name, out_dir, recipe, data_root)
        card = dict(family=family, dataset=cfg.dataset, recipe=asdict(recipe),
                    command=f"klas anchors train {family} --epochs {recipe.epochs} --seed {recipe.seed}",
                    machine=machine_info(),
                    anchors=[entries[x.name] for x in cfg.anchors if x.name in entries])
        save_json(card, card_path)
    return card_path


def card_file(folder: Path, family: str) -> Path:
    """``<family>-card.json`` in ``folder``; fmnist-deit's card predates the naming and is ``card.json``."""
    legacy = Path(folder) / "card.json"
    if legacy.is_file() and load_json(legacy).get("family") == family:
        return legacy
    return Path(folder) / f"{family}-card.json"


def load_card(family: str) -> dict:
    cfg = get_family_cfg(family)
    if not cfg.embedded:
        raise KlasError(f"family {family}: not an embedded family, it has no model card (embedded: "
                        f"{', '.join(n for n in list_families() if get_family_cfg(n).embedded)})")
    return load_json(card_file(_EMBEDDED_WEIGHTS, family))


def zoo_eval(family: str, data_root: Path | None = None, split: str = "test") -> list[dict]:
    """Print and return params, FLOPs and the task's measured score of an embedded family's shipped weights beside
    its card (accuracy for classifiers, 100/perplexity for language models)."""
    from klas.config import DataConfig
    from klas.families._registry import create_family
    from klas.metrics import network_score
    from klas.tasks import task_of

    cfg = get_family_cfg(family)
    task = task_of(cfg)
    card = {e["name"]: e for e in load_card(family)["anchors"]}
    data = task.open_split(cfg, split, DataConfig(root=str(data_root) if data_root else None))
    fam = create_family(family, pretrained=True)
    rows = []
    print(f"{'anchor':16s} {'params':>9s} {'MFLOPs':>8s} {split + ' score':>11s} {'card':>9s}  ({task.metric}, per "
          f"{task.cost_unit})")
    for view in fam:
        view.eval()
        acc = network_score(task, view, data, 32)  # small batches: a language model's logits are [B, T, V]
        ref = card.get(view.name, {}).get(f"{split}_acc")
        if ref is None and card.get(view.name, {}).get(f"{split}_perplexity"):
            ref = 100.0 / card[view.name][f"{split}_perplexity"]
        rows.append(dict(name=view.name, params=view.num_params, flops=view.flops, acc=acc, card_acc=ref))
        ref_s = f"{ref:9.3f}" if ref is not None else f"{'-':>9s}"
        print(f"{view.name:16s} {view.num_params:9d} {view.flops / 1e6:8.2f} {acc:11.3f} {ref_s}")
    return rows
