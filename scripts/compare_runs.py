"""Do two run directories hold the same results? ``python scripts/compare_runs.py RUN_A RUN_B``

Per stage, what the results are, not the bytes that vary from one process to the next: the tensors of every
safetensors file (the files' JSON headers list their metadata in a per-process order, so file hashes differ between
two runs of identical weights), the ONNX files byte for byte, and the JSON records without the fields that record
when, where and how long (wall times, dates, machine, latency figures, the run's own paths). Prints one line per file
and exits 1 when anything differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

VOLATILE = {"wall_s", "created", "finished", "measured_at", "machine", "created_on", "latency", "latency_ms",
            "profiles", "path", "run_dir", "world_size", "klas_version", "timing", "p50_ms", "p90_ms", "p99_ms"}
RENAMED = {"finetune/supernet.json": "finetune/finetune.json"}  # the finetune record's name before issue 25


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in VOLATILE and "latency" not in k and not k.endswith("wall_s")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _diff(x, y, path: str) -> list[str]:
    """Where two JSON values differ, as 'path: a | b' lines (a key on one side only: 'path: only in A/B')."""
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in dict.fromkeys([*x, *y]):
            out += (_diff(x[k], y[k], f"{path}/{k}") if k in x and k in y else
                    [f"{path}/{k}: only in {'A' if k in x else 'B'}"])
        return out
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for k, (a, b) in enumerate(zip(x, y)) for d in _diff(a, b, f"{path}[{k}]")]
    return [] if x == y else [f"{path}: {str(x)[:60]} | {str(y)[:60]}"]


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def same(a: Path, b: Path) -> tuple[bool, str]:
    if a.suffix == ".safetensors":
        ta, tb = _tensors(a), _tensors(b)
        if ta.keys() != tb.keys():
            return False, f"tensor names differ ({len(ta)} vs {len(tb)})"
        bad = [k for k in ta if ta[k].shape != tb[k].shape or ta[k].tobytes() != tb[k].tobytes()]
        return not bad, f"{len(ta)} tensors equal" if not bad else f"{len(bad)} tensors differ, e.g. {bad[0]}"
    if a.suffix == ".json":
        ja, jb = _strip(json.loads(a.read_text())), _strip(json.loads(b.read_text()))
        where = _diff(ja, jb, "")
        return not where, "records equal (timings left out)" if not where else \
            f"{len(where)} fields differ: " + "; ".join(where[:4]) + (" ..." if len(where) > 4 else "")
    ok = a.read_bytes() == b.read_bytes()
    if ok or a.suffix != ".onnx":
        return ok, "bytes equal" if ok else "bytes differ"
    import onnx

    ga, gb = onnx.load(str(a)), onnx.load(str(b))  # the graph, and the manifest entry embedded beside it
    if ga.graph.SerializeToString() != gb.graph.SerializeToString():
        return False, "graphs differ"
    ma, mb = ({p.key: json.loads(p.value) for p in g.metadata_props} for g in (ga, gb))
    where = _diff(_strip(ma), _strip(mb), "metadata")
    return False, "graph bytes equal; embedded entry: " + "; ".join(where[:3])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0])
        return 2
    ra, rb = map(Path, argv)
    files = sorted(p.relative_to(ra).as_posix() for p in ra.rglob("*")
                   if p.is_file() and p.suffix in (".safetensors", ".onnx") or p.name in (
                       "probes.json", "scores.json", "selection.json", "supernet.json", "evaluation.json",
                       "manifest.json"))
    bad = 0
    for rel in files:
        other = rb / RENAMED.get(rel, rel)
        if not other.is_file():
            print(f"{rel}: missing in {rb}")
            bad += 1
            continue
        ok, why = same(ra / rel, other)
        bad += not ok
        print(f"{'same' if ok else 'DIFF'}  {rel}: {why}")
    print(f"{len(files) - bad}/{len(files)} files hold the same results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
