"""The README's precision-variant table of a profiled zoo: accuracy, size on disk and this device's latency of every
entry (fp32 / fp16 / int8 / cascades) at each measured batch size, from ``ZOO/manifest.json``.

    python benchmarks/variants_table.py ZOO_DIR [--stat p50] [--out benchmarks/results/variants_fmnist-deit.md]

Run ``klas profile ZOO_DIR --threads 1 --batch 1 32`` first; only this machine's records are used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from klas_runtime.manifest import load_manifest, precision
from klas_runtime.profile import device_key, device_profile


def table(zoo_dir: Path, stat: str = "p50", threads: int = 1) -> str:
    manifest = load_manifest(zoo_dir)
    prof = device_profile(manifest, "cpu", "p90" if stat == "mean" else stat)
    tables = {t["batch"]: {r["name"]: r for r in t["entries"]} for t in prof["settings"] if t["threads"] == threads}
    fronts = {t["batch"]: set(t["front"]) for t in prof["settings"] if t["threads"] == threads}
    batches = sorted(tables)
    head = ["entry", "precision", "test acc %", "Δ vs fp32", "top-1 agree / max |Δlogit| vs fp32", "size KB"]
    head += [f"{stat} ms, batch {b}" for b in batches]
    lines = [f"device: {device_key('cpu')}, {threads} thread(s); * = on that batch's {prof['stat']} front", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in manifest["models"]:
        kind = "cascade" if e.get("kind") == "cascade" else precision(e)
        v = e.get("variant")
        loss = f"{-v['accuracy_loss']:+.2f}" if v else ""
        par = (f"{e['parity']['top1_agreement'] * 100:.2f} % / {e['parity']['max_abs_diff']:.3g}" if v else "")
        size = f"{e['bytes'] / 1000:.0f}" if "bytes" in e else "(members)"
        row = [e["name"], kind, f"{e['test_acc']:.2f}", loss, par, size]
        for b in batches:
            r = tables[b].get(e["name"])
            row.append(f"{r[f'{stat}_ms']:.3f}{'*' if e['name'] in fronts[b] else ''}" if r else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo_dir", type=Path)
    p.add_argument("--stat", default="p50", choices=("p50", "p90", "p99"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    text = table(a.zoo_dir, a.stat, a.threads)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
