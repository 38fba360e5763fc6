"""Variants against their float32 parent, honest about noise: what ``Zoo.pick`` offers of a parent's fp16 / int8
variants.

A variant and its parent are the same classifier in another arithmetic; a test accuracy difference between them
counts only where the paired sign test recorded at export (``variant.significance``, the zoo admission's test, run
both ways on the test samples) says it is significant. Otherwise the variant is as accurate as its parent and
competes on what is measured: latency on this device (the pick's provider, batch, threads and statistic), then
other devices' records, and bytes. A variant slower than its parent wherever both were timed, and not
significantly more accurate, is not offered; the pick says so, with the figures. Pure Python (no torch, no
scipy): the test's verdict comes from the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass

from klas_runtime.manifest import precision as precision_of


@dataclass(frozen=True)
class Review:
    """One variant against its parent: ``offered`` (False: left out of the pick, ``reason`` says why),
    ``accuracy`` (what it competes with: its own test accuracy if significantly different, else its parent's),
    ``faster`` (timed faster than its parent here), ``text`` (one clause for the pick's explanation)."""

    name: str
    parent: str
    offered: bool
    accuracy: float
    faster: bool
    text: str


def significance_text(entry: dict) -> tuple[str, str]:
    """(verdict, clause): the recorded paired sign test of a variant against its parent; ``"unknown"`` for
    variants exported before it was recorded (their difference is then not counted)."""
    sig = (entry.get("variant") or {}).get("significance")
    if not sig:
        return "unknown", "no paired test recorded (re-export to record it): its accuracy difference is not counted"
    p = sig["p_more_accurate"] if sig["verdict"] != "less accurate" else sig["p_less_accurate"]
    return sig["verdict"], (f"{sig['verdict']} on {sig['samples']} test samples (paired sign test: "
                            f"{sig['only_variant']} right only for the variant, {sig['only_parent']} only for the "
                            f"parent, p = {p:.3g}, alpha {sig['alpha']:g})")


def _other_devices(entry: dict, parent: dict, provider: str, batch: int, here: str) -> list[tuple[str, float, float]]:
    """(device, variant p90, parent p90) on every other device where both were timed at ``batch``."""
    def best(e, dev):
        recs = [r["p90_ms"] for r in e["latency"] if r["device"] == dev and r["batch"] == batch
                and r["provider"] == provider]
        return min(recs) if recs else None

    devices = sorted({r["device"] for r in entry["latency"]} - {here})
    pairs = [(d, best(entry, d), best(parent, d)) for d in devices]
    return [(d, v, p) for d, v, p in pairs if v is not None and p is not None]


def review(entries: list[dict], lat: dict, stat: str, where: str, provider: str, batch: int,
           here: str) -> dict[str, Review]:
    """Every variant of ``entries`` whose parent is among them (name -> Review). ``lat``: name -> (latency, record)
    on this device or None (``Zoo.latency``); ``here``: this device's label."""
    by = {e["name"]: e for e in entries}
    out = {}
    for v in entries:
        parent = by.get(v.get("parent")) if precision_of(v) != "fp32" else None
        if parent is None:
            continue
        verdict, sig = significance_text(v)
        counts = verdict in ("more accurate", "less accurate")
        accuracy = v["test_acc"] if counts else parent["test_acc"]
        acc = f"{v['test_acc']:.2f} vs {parent['test_acc']:.2f}%"
        size = f"{v['bytes'] / 1e3:.0f} vs {parent['bytes'] / 1e3:.0f} KB"
        mine, theirs = lat.get(v["name"]), lat.get(parent["name"])
        if mine is not None and theirs is not None:
            slower = mine[0] >= theirs[0]
            speed = f"{stat} {mine[0]:.3g} vs {theirs[0]:.3g} ms on {where}"
        else:
            others = _other_devices(v, parent, provider, batch, here)
            slower = bool(others) and all(a >= b for _, a, b in others)
            speed = ("; ".join(f"p90 {a:.3g} vs {b:.3g} ms on {d}" for d, a, b in others) if others
                     else "not timed against its parent on any device")
        if slower and verdict != "more accurate":
            out[v["name"]] = Review(v["name"], parent["name"], False, accuracy, False,
                                    f"{v['name']} not offered: slower than {parent['name']} ({speed}), {size}, "
                                    f"and not significantly more accurate ({acc}; {sig})")
            continue
        faster = mine is not None and theirs is not None and mine[0] < theirs[0]
        how = (f"faster than {parent['name']} ({speed})" if faster else f"speed against {parent['name']}: {speed}")
        out[v["name"]] = Review(v["name"], parent["name"], True, accuracy, faster,
                                f"{v['name']}: {how}, {size}; accuracy {acc}, {sig}")
    return out
