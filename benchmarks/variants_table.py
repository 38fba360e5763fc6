"""The README's precision-variant table of a profiled zoo: accuracy, size on disk and this device's latency of every
entry (fp32 / fp16 / int8 / cascades) at each measured batch size, from ``ZOO/manifest.json``; per variant the
paired sign test against its float32 parent recorded at export and whether ``klas pick`` offers it on this device
(``klas_runtime.variant_review``); then per precision what it costs and buys on this CPU (size and latency ratios
against the parent, accuracy changes and how many are significant). Writes the markdown and a JSON beside it.

    python benchmarks/variants_table.py ZOO_DIR [--stat p50] [--out benchmarks/results/zoo_variants_fmnist-deit.md]

Run ``klas profile ZOO_DIR --threads 1 --batch 1 32`` first; only this machine's records are used.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from klas_runtime.manifest import load_manifest, precision
from klas_runtime.profile import device_key, device_profile
from klas_runtime.runtime import Zoo
from klas_runtime.session import device_label, provider_name
from klas_runtime.variant_review import review


def table(zoo_dir: Path, stat: str = "p50", threads: int = 1) -> tuple[str, dict]:
    manifest = load_manifest(zoo_dir)
    prof = device_profile(manifest, "cpu", "p90" if stat == "mean" else stat)
    tables = {t["batch"]: {r["name"]: r for r in t["entries"]} for t in prof["settings"] if t["threads"] == threads}
    fronts = {t["batch"]: set(t["front"]) for t in prof["settings"] if t["threads"] == threads}
    batches = sorted(tables)
    zoo, provider = Zoo(zoo_dir, verify=False), provider_name("cpu")
    lat = {m["name"]: zoo.latency(m, provider, batches[0] if batches else 1, threads, stat) for m in zoo.entries}
    reviews = review(zoo.entries, lat, stat, f"cpu, batch {batches[0] if batches else 1}", provider,
                     batches[0] if batches else 1, device_label(provider))
    by = {e["name"]: e for e in manifest["models"]}
    head = ["entry", "precision", "test acc %", "Δ vs fp32", "paired test vs fp32",
            "top-1 agree / max |Δlogit| vs fp32", "size KB", f"pick (batch {batches[0] if batches else 1})"]
    head += [f"{stat} ms, batch {b}" for b in batches]
    lines = [f"device: {device_key('cpu')}, {threads} thread(s); * = on that batch's {prof['stat']} front", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = {}
    for e in manifest["models"]:
        kind = "cascade" if e.get("kind") == "cascade" else precision(e)
        v = e.get("variant")
        loss = f"{-v['accuracy_loss']:+.2f}" if v else ""
        sig = (v.get("significance") or {}).get("verdict", "not recorded") if v else ""
        par = (f"{e['parity']['top1_agreement'] * 100:.2f} % / {e['parity']['max_abs_diff']:.3g}" if v else "")
        size = f"{e['bytes'] / 1000:.0f}" if "bytes" in e else "(members)"
        r = reviews.get(e["name"])
        pick = ("offered" if r.offered else "not offered") if r else ""
        row = [e["name"], kind, f"{e['test_acc']:.2f}", loss, sig, par, size, pick]
        for b in batches:
            rec = tables[b].get(e["name"])
            row.append(f"{rec[f'{stat}_ms']:.3f}{'*' if e['name'] in fronts[b] else ''}" if rec else "—")
        lines.append("| " + " | ".join(row) + " |")
        if v:
            parent = by[e["parent"]]
            ms = {b: (tables[b].get(e["name"]), tables[b].get(parent["name"])) for b in batches}
            per.setdefault(kind, []).append(dict(
                name=e["name"], parent=parent["name"], accuracy_change=-v["accuracy_loss"], significance=sig,
                size_ratio=e["bytes"] / parent["bytes"], offered=bool(r and r.offered),
                latency_ratio={b: m[f"{stat}_ms"] / f[f"{stat}_ms"] for b, (m, f) in ms.items() if m and f}))
    lines += ["", f"What each precision costs and buys on this CPU against its float32 parent (median over "
              f"{', '.join(f'{len(v)} {k}' for k, v in per.items())} variants; latency ratio < 1: faster):", "",
              "| precision | size × | " + " | ".join(f"{stat} latency ×, batch {b}" for b in batches)
              + " | accuracy change (points) | significant | offered by pick |",
              "|---|---|" + "---|" * len(batches) + "---|---|---|"]
    summary = {}
    for kind, rows in per.items():
        lat_r = {b: [r["latency_ratio"][b] for r in rows if b in r["latency_ratio"]] for b in batches}
        summary[kind] = dict(size_ratio=statistics.median(r["size_ratio"] for r in rows),
                             latency_ratio={b: statistics.median(x) for b, x in lat_r.items() if x},
                             accuracy_change=[min(r["accuracy_change"] for r in rows),
                                              max(r["accuracy_change"] for r in rows)],
                             significant=sum(r["significance"] not in ("not significant", "not recorded")
                                             for r in rows),
                             offered=sum(r["offered"] for r in rows), variants=len(rows))
        s_ = summary[kind]
        lines.append(f"| {kind} | {s_['size_ratio']:.2f} | "
                     + " | ".join(f"{s_['latency_ratio'][b]:.2f}" if b in s_["latency_ratio"] else "—"
                                  for b in batches)
                     + f" | {s_['accuracy_change'][0]:+.2f} .. {s_['accuracy_change'][1]:+.2f} | "
                       f"{s_['significant']}/{len(rows)} | {s_['offered']}/{len(rows)} |")
    data = dict(device=device_key("cpu"), threads=threads, stat=stat, zoo=str(zoo_dir), variants=per,
                summary=summary, family=manifest["family"])
    return "\n".join(lines) + "\n", data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo_dir", type=Path)
    p.add_argument("--stat", default="p50", choices=("p50", "p90", "p99"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    text, data = table(a.zoo_dir, a.stat, a.threads)
    print(text)
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
