"""Anchors that do not match the dataset: ``klas anchors adapt`` gives every anchor a new classifier for the
dataset's classes and finetunes it with one recipe for all anchors, then writes a family the pipeline can run.

An ImageNet-pretrained family predicts 1000 classes; a user's data may have 10. The pipeline refuses such a pair
before any stage runs (``check_anchor_classes``, one line naming this command). ``adapt_family``:

* builds the family as ``klas run`` would (``[run] family``, ``[run] weights``) and reads the dataset through
  ``klas.data.open_split`` with the family's own preprocessing (``Family.data_config``);
* per anchor: ``model.reset_classifier(n)`` (timm's own head replacement) after seeding with the recipe's seed,
  then ``klas.families.trainer.fit`` -- the anchor trainer's loop (``klas.train.Trainer``: AdamW with timm's
  no-decay groups, warm-up + cosine, clipping), resumable exactly from ``<out>/<anchor>.ckpt`` (epoch ends and
  every ``ckpt_every`` steps): a run killed at any moment and run again ends with bit-identical weights;
* writes ``<out>/<anchor>.safetensors``, ``<out>/family.toml`` (a ``[family]`` table: the anchors' architectures
  with ``num_classes = n``, their new weights files and the preprocessing they were finetuned with, as
  ``[family.input]``), ``<out>/run.toml`` (the run's config pointing at that family) and ``<out>/adapt.json``
  (recipe, classes, per-anchor history and sha256).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from klas.contract import overrides, setting
from klas.errors import KlasError
from klas.families.trainer import Recipe

RECORD = "adapt.json"
FAMILY_FILE = "family.toml"
RUN_FILE = "run.toml"


@dataclass(frozen=True)
@overrides(epochs=(5, "finetuning epochs"), batch_size=64, lr=5e-4, warmup_epochs=0.5,
           seed=(0, "seed of the new heads and the data order"))
class AdaptRecipe(Recipe):
    """One finetuning recipe for every anchor: a new classifier for the dataset's classes, then the whole anchor
    trained (the anchor trainer's loop; AdamW with no weight decay on biases, norms and embeddings)."""

    ckpt_every: int = setting(200, "steps between checkpoints within an epoch (one is written at every epoch end)",
                              ge=1)


# --------------------------------------------------------------------------------------------------- the check
def dataset_classes(dataset: str, root) -> int | None:
    """The number of classes of ``dataset`` without decoding it: fixed for Fashion-MNIST (10) and CIFAR-100 (100),
    the class folders of ``root/train`` for an ImageFolder; None when that cannot be known yet (a missing root:
    the stage that reads it says so)."""
    from klas.data.datasets import BUILTIN_SPECS

    if dataset in BUILTIN_SPECS:
        return BUILTIN_SPECS[dataset].num_classes
    if dataset == "imagefolder" and root is not None and (Path(root) / "train").is_dir():
        return sum(1 for e in os.scandir(Path(root) / "train") if e.is_dir() and not e.name.startswith("."))
    return None


def check_anchor_classes(cfg, config_hint: str | None = None) -> None:
    """Refuse, in one line naming the command that fixes it, a family whose anchors' classifiers do not predict
    the dataset's classes (an ImageNet-pretrained family on a user's 10-class data)."""
    from klas.families import get_family_cfg

    fam = get_family_cfg(cfg.run.family)
    dataset = cfg.data.dataset or fam.dataset
    n = dataset_classes(dataset, cfg.data.root)
    if n is None or n == fam.num_classes:
        return
    where = cfg.data.root if dataset == "imagefolder" else dataset
    src = config_hint or (fam.source if fam.source.endswith(".toml") else "CONFIG.toml")
    raise KlasError(f"family {fam.name}: its anchors' classifiers predict {fam.num_classes} classes but the "
                    f"{dataset} data ({where}) has {n}; give each anchor a {n}-class head first: "
                    f"`klas anchors adapt {src} --out DIR`, then `klas run DIR/{RUN_FILE}`")


# ------------------------------------------------------------------------------------------------------ adapt
def _input_table(dc: dict) -> dict:
    c, h, w = dc["input_size"]
    return dict(channels=int(c), size=[int(h), int(w)], mean=[float(v) for v in dc["mean"]],
                std=[float(v) for v in dc["std"]], interpolation=dc["interpolation"], crop_pct=float(dc["crop_pct"]),
                crop_mode=dc["crop_mode"])


def adapt_family(cfg, out_dir: Path | str, recipe: AdaptRecipe = AdaptRecipe(), *, name: str | None = None,
                 anchors: list[str] | None = None, data_root: Path | str | None = None, on_step=None,
                 progress: bool = True) -> Path | None:
    """Adapt every anchor of the run config ``cfg``'s family to its dataset's classes (see the module doc);
    returns the path of the family file (None while ``anchors`` leaves some of the family's anchors to adapt). Anchors already adapted with this recipe (their record and weights file
    agree) are skipped; an interrupted one resumes from its checkpoint. ``on_step(anchor, step)`` is called after
    every optimizer step; ``progress``: progress bars."""
    import torch

    from klas.data import open_split
    from klas.families import create_family, get_family_cfg
    from klas.families.trainer import fit
    from klas.families.user import render_family
    from klas.io import load_json, save_json, save_tensors, sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fcfg = get_family_cfg(cfg.run.family)
    new_name = name or f"{fcfg.name}-adapted"
    if new_name == fcfg.name or (new_name in _registered() and not get_family_cfg(new_name).source):
        taken = "the family being adapted" if new_name == fcfg.name else "a registered family"
        raise KlasError(f"--name {new_name!r}: taken by {taken}; choose another name")
    dataset = cfg.data.dataset or fcfg.dataset
    root = data_root if data_root is not None else cfg.data.root
    family = create_family(fcfg.name, pretrained=True, weights=cfg.run.weights)
    chosen = [v for v in family if anchors is None or v.name in anchors]
    if anchors is not None and len(chosen) != len(set(anchors)):
        raise KlasError(f"--anchor {anchors}: family {fcfg.name} has anchors {', '.join(v.name for v in family)}")
    dc = family.data_config
    inp = _input_table(dc)
    n = dataset_classes(dataset, root)
    # the family as the data pipeline sees it once adapted: n classes, its preprocessing spelt out in full
    adapted = replace(fcfg, num_classes=n or 10 ** 6, input_shape=tuple(dc["input_size"]),
                      input={**inp, "size": tuple(inp["size"]), "mean": tuple(inp["mean"]), "std": tuple(inp["std"])})
    train = open_split(adapted, "train", cfg.data, root=root, dataset=dataset, augment=True)
    train = train.subset(recipe.train_subset)
    val = open_split(adapted, "val", cfg.data, root=root, dataset=dataset)
    classes = list(train.spec.classes) or [str(k) for k in range(train.spec.num_classes)]
    n = len(classes)
    record_path = out / RECORD
    record = load_json(record_path) if record_path.is_file() else {}
    done = {e["name"]: e for e in record.get("anchors", [])}
    base = dict(family=fcfg.name, dataset=dataset, classes=classes, data_config=_input_table(dc),
                recipe=asdict(recipe), train_images=len(train), val_images=len(val))
    if record and {k: record.get(k) for k in base} != base:
        raise KlasError(f"{record_path}: made for another family, dataset or recipe; use another --out or delete "
                        f"the folder to start over")
    entries = []
    for view in chosen:
        weights = out / f"{view.name}.safetensors"
        tag = dict(base, anchor=view.name, arch=view.model.__class__.__name__)
        prev = done.get(view.name)
        if prev is not None and prev.get("tag") == tag and weights.is_file() and sha256_file(weights) == prev["sha256"]:
            print(f"[adapt] {view.name}: already adapted ({weights})", flush=True)
            entries.append(prev)
            continue
        model = view.model
        torch.manual_seed(recipe.seed)  # the new head: a function of the seed only, whatever ran before
        model.reset_classifier(n)
        step_hook = (lambda s, a=view.name: on_step(a, s)) if on_step is not None else None
        state = fit(model, train, val, recipe, out / f"{view.name}.ckpt", view.name, resume_tag=tag, no_decay=True,
                    ckpt_every=recipe.ckpt_every, on_step=step_hook, log="adapt", progress=progress)
        acfg = next(a for a in fcfg.anchors if a.name == view.name)
        save_tensors(model.state_dict(), weights, metadata={"family": new_name, "anchor": view.name,
                                                            "adapted_from": fcfg.name})
        entry = dict(name=view.name, arch=acfg.arch, model_args={**acfg.model_args, "num_classes": n},
                     file=weights.name, sha256=sha256_file(weights), val_acc=state["history"][-1]["val_acc"],
                     history=state["history"], wall_s=round(state["wall_s"], 1), tag=tag)
        entries.append(entry)
        done[view.name] = entry
        record = dict(base, name=new_name, anchors=[done[v.name] for v in family if v.name in done])
        save_json(record, record_path)  # the record first, then the checkpoint goes: a kill between is harmless
        (out / f"{view.name}.ckpt").unlink(missing_ok=True)
        model.eval()
        print(f"[adapt] {view.name}: {n}-class head, val {entry['val_acc']:.2f}% -> {weights}", flush=True)
    adapted_all = [done[v.name] for v in family if v.name in done]
    if len(adapted_all) < len(family):
        rest = ", ".join(v.name for v in family if v.name not in done)
        print(f"[adapt] {len(adapted_all)} of {len(family)} anchors adapted; adapt {rest} too (--anchor, or no "
              f"--anchor) and {FAMILY_FILE} is written", flush=True)
        return None
    definition = dict(name=new_name, dataset=dataset, num_classes=n,
                      description=f"{fcfg.name} adapted to {n} classes of {dataset} by `klas anchors adapt`",
                      input=inp,
                      anchors=[dict(name=e["name"], arch=e["arch"], model_args=e["model_args"], weights=e["file"])
                               for e in adapted_all])
    family_file = out / FAMILY_FILE
    _write_text(family_file, f"# written by `klas anchors adapt` from family {fcfg.name} ({RECORD} says how)\n"
                + render_family(definition))
    _write_text(out / RUN_FILE, _run_toml(cfg, root, dataset))
    save_json(dict(base, name=new_name, anchors=adapted_all), record_path)
    return family_file


def _registered() -> list[str]:
    from klas.families import list_families

    return list_families()


def _write_text(path: Path, text: str) -> None:
    from klas.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _run_toml(cfg, root, dataset: str) -> str:
    """The run's config with ``[run] family`` pointing at the adapted family file (next to it) and the data root
    made absolute."""
    from klas.config import render_toml

    values = {k: cfg[k] for k in cfg._values}
    values["run"] = replace(cfg.run, family=FAMILY_FILE, weights=None)
    values["data"] = replace(cfg.data, dataset=dataset,
                             root=str(Path(root).expanduser().resolve()) if root is not None else None)
    return "# written by `klas anchors adapt`: the run's config, on the adapted family\n" + \
        render_toml(values, comments=False)
