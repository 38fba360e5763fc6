"""Runtime entries: what klas-runtime does with a zoo's models, keyed by the manifest's ``runtime_entry``.

The exporter writes a task's ``manifest_fields`` (``task``, ``cost_unit``, ``metric``, ``runtime_entry``) into
the manifest header; ``Zoo.open`` / ``pick`` / ``predict`` and ``verify_zoo`` serve a zoo through the entry it
names. A manifest without the field (written before tasks existed) is served by ``classify``: image preprocessing,
logits, softmax and argmax, max-softmax cascades (``klas_runtime.classify``). Another kind of model registers its
own entry here (``register_entry``); a zoo naming an entry this runtime does not have is refused in one line.
``generate`` serves decoder zoos (``klas_runtime.generate``: tokenizer, KV-cache loop, sampling, streaming; budgets
per output token, to the first token and in memory, ``klas_runtime.decoder_pick``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from klas_runtime import classify, decoder_pick, decoder_profile, generate
from klas_runtime.errors import ZooError
from klas_runtime.manifest import MANIFEST, is_cascade
from klas_runtime.preprocess import load_image
from klas_runtime.registry import Registry

DEFAULT_ENTRY = "classify"  # what a manifest without ``runtime_entry`` means


@dataclass(frozen=True)
class RuntimeEntry:
    """How the runtime serves one kind of zoo.

    ``model`` builds the choice of a model entry, ``model(entry, session, reason, provider)``; ``cascade`` that of
    a cascade entry, the same plus ``parts=`` (the members' choices), or None when the entry has no cascades.
    ``load_input(path, spec)``: one input file -> a batch of one as the model takes it (``spec``: the entry's
    ``input``). ``describe(choice, x)``: the prediction on that batch as one line. ``check_cascade(choice)``: what
    ``verify_zoo`` runs on a cascade -- a problem line or None.

    ``check_model(session, entry, where)``: what ``verify_zoo`` asks of each model file's session beyond hash and
    metadata (its inputs and outputs against the manifest), raising one ZooError line; ``check_zoo(zoo_dir,
    manifest)``: the zoo-level problems (lines), e.g. a tokenizer's; ``verified``: what a clean verify checked, for
    its summary line. ``context(zoo_dir, manifest)``: extra keyword arguments of ``model`` (what a choice needs from
    the zoo). ``budgets``: the ``Zoo.pick`` budgets this kind of zoo has figures for; ``pick(zoo, **budgets)``: its
    own pick (None: the image pick of ``klas_runtime.runtime``). ``profile(zoo_dir, manifest, entry, provider,
    threads, batch, warmup, runs, **options)``: one latency record (None: the image models' and cascades'
    measurement), ``profile_defaults``: its (warmup, runs) when the caller gives none."""

    name: str
    model: type
    load_input: Callable
    describe: Callable
    cascade: type | None = None
    check_cascade: Callable | None = None
    check_model: Callable | None = None
    check_zoo: Callable | None = None
    verified: str = "every file matches its sha256, loads as ONNX and agrees with the manifest"
    context: Callable | None = None
    budgets: tuple[str, ...] = ("max_flops", "max_latency_ms", "min_accuracy")
    pick: Callable | None = None
    profile: Callable | None = None
    profile_defaults: tuple[int, int] = (20, 200)


_ENTRIES: Registry[RuntimeEntry] = Registry("runtime entry")


def register_entry(entry: RuntimeEntry, replace: bool = False) -> RuntimeEntry:
    """Make ``entry`` serve the zoos whose manifest names ``entry.name``; a second entry of that name is refused
    unless ``replace``."""
    return _ENTRIES.register(entry.name, entry, replace=replace)


def registered_entries() -> tuple[str, ...]:
    return _ENTRIES.names()


def entry_name(manifest: dict) -> str:
    """The runtime entry a manifest asks for (``classify`` when it names none)."""
    return manifest.get("runtime_entry", DEFAULT_ENTRY)


def runtime_entry(manifest: dict, zoo_dir: Path | str) -> RuntimeEntry:
    """The registered entry that serves ``manifest`` (of the zoo in ``zoo_dir``), or one ZooError line naming the
    manifest and the registered entries."""
    name = entry_name(manifest)
    if name not in _ENTRIES:
        task = f" (task {manifest['task']!r})" if manifest.get("task") else ""
        raise ZooError(f"{Path(zoo_dir) / MANIFEST}: runtime entry {name!r}{task} is not one this klas-runtime "
                       f"serves (registered: {', '.join(_ENTRIES.names()) or 'none'}); upgrade klas-runtime, or "
                       f"register the entry with klas_runtime.entries.register_entry")
    return _ENTRIES.get(name)


def make_choice(rt: RuntimeEntry, entry: dict, session, reason: str, provider: str, parts: tuple = (),
                context: dict | None = None):
    """The entry's choice object for one manifest entry: a model's (with ``context``, the entry's ``context``
    keyword arguments), or a cascade's over ``parts``."""
    if not is_cascade(entry):
        return rt.model(entry, session, reason, provider, **(context or {}))
    if rt.cascade is None:
        raise ZooError(f"{entry['name']}: runtime entry {rt.name!r} serves no cascades")
    return rt.cascade(entry, session, reason, provider, parts=parts)


register_entry(RuntimeEntry(DEFAULT_ENTRY, model=classify.Choice, cascade=classify.CascadeChoice,
                            load_input=load_image, describe=classify.describe,
                            check_cascade=classify.check_cascade, check_model=classify.check_signature))
register_entry(RuntimeEntry("generate", model=generate.DecoderChoice, load_input=generate.load_prompt,
                            describe=generate.describe, check_model=generate.check_model,
                            check_zoo=generate.check_zoo, verified=generate.VERIFIED, context=generate.context,
                            budgets=decoder_pick.BUDGETS, pick=decoder_pick.pick, profile=decoder_profile.profile,
                            profile_defaults=(1, 5)))
