"""The closing summary of ``klas run`` for a language-model zoo: per model its costs per token, its val and test
perplexity, the ROUGE of its continuations, and whether it joined the zoo and why."""
from __future__ import annotations

from pathlib import Path


def _why(r: dict, zoo_keys: set, level: float) -> str:
    adm = r.get("admission") or {}
    ref, p = adm.get("reference"), adm.get("p_value")
    if r["key"] in zoo_keys:
        return "admitted: " + (f"beats {ref} on val (p {p:.2g} < {level:.2g})" if ref else "cheaper than every anchor")
    if r.get("admitted"):
        return "not offered: another zoo member is cheaper and at least as good on val"
    if ref is None:
        return "not admitted"
    return f"not admitted: not significantly better than {ref} on val (p {p:.2g} >= {level:.2g})"


def print_lm_zoo(ev, run_dir: Path) -> None:
    adm = ev.admission
    rows = sorted(ev.configs, key=lambda r: r["flops"])
    zoo_keys = {z["key"] for z in ev.zoo}
    n_admitted = sum(z["kind"] == "configuration" for z in ev.zoo)
    context = None
    try:
        from klas.families import get_family_cfg

        context = int(get_family_cfg(ev.family).input_shape[0])
    except Exception:  # noqa: BLE001 -- a family this process does not know
        pass
    at = f" at a {context}-token context" if context else ""
    print(f"\n== {ev.family} on {ev.dataset}: {len(ev.untouched)} untouched anchors + {n_admitted} of {len(rows)} "
          f"stitched models admitted (paired sign test on per-sequence loss on {ev.n_val} val sequences; test "
          f"figures on {ev.n_test} sequences, reported after the choice). FLOPs and KV bytes per token{at}.")
    head = (f"{'model':34s} {'MFLOP/tok':>9s} {'KV B/tok':>8s} {'val ppl':>8s} {'test ppl':>8s} {'R-1':>6s} "
            f"{'R-2':>6s} {'R-L':>6s} {'tok/s':>7s}  zoo")
    print(head)

    def line(name: str, r: dict, why: str) -> str:
        lat = r.get("latency_ms")
        tps = f"{context / lat * 1e3:7.0f}" if lat and context else f"{'-':>7s}"
        rg = " ".join(f"{r[k]:6.3f}" if r.get(k) is not None else f"{'-':>6s}"
                      for k in ("test_rouge1", "test_rouge2", "test_rougeL"))
        return (f"{name:34s} {r['flops'] / 1e6:9.3f} {r.get('kv_bytes_per_token', 0):8d} "
                f"{r.get('val_perplexity', float('nan')):8.2f} {r.get('test_perplexity', float('nan')):8.2f} {rg} "
                f"{tps}  {why}")

    for u in sorted(ev.untouched, key=lambda u: u["flops"]):
        print(line(u["key"] + " (untouched)", u, "anchor, as given"))
    for r in rows:
        name = r["key"] if not r["anchor"] else f"{r['key']}.finetuned"
        print(line(name, r, _why(r, zoo_keys, adm.get("level", 0.0))))
    if ev.zoo_auc is not None and ev.anchors_auc is not None:
        print(f"zoo AUC {ev.zoo_auc:.4f} vs untouched anchors alone {ev.anchors_auc:.4f} (100/perplexity vs "
              f"normalized FLOPs per token)")
    print(f"evaluation: {Path(run_dir) / 'evaluation' / 'evaluation.json'}")
    zoo = Path(run_dir) / "zoo"
    if (zoo / "manifest.json").is_file():
        print_decoder_zoo(zoo)


def _ttft(rec: dict, length: int) -> str:
    t = (rec or {}).get("ttft_ms", {}).get(str(length))
    return f"{t:8.2f}" if t is not None else f"{'-':>8s}"


def print_decoder_zoo(zoo_dir: Path, prompt: int = 64) -> None:
    """The exported zoo as deployed: per entry FLOPs/token, test perplexity, time to first token at a ``prompt``-token
    prompt, ms per output token p50/p90 (batch 1) and tokens/s at batch 8 on this machine, KV bytes per token, file
    bytes, peak memory; then the variants left out and why."""
    from klas_runtime.manifest import read_manifest

    m = read_manifest(zoo_dir)
    print(f"\n== zoo {zoo_dir} ({len(m['models'])} ONNX decoders; latency measured on this machine: "
          f"{m['created_on']['cpu']}, {m['created_on']['cores']} cores, onnxruntime {m['created_on']['onnxruntime']})")
    print(f"{'entry':40s} {'MFLOP/tok':>9s} {'test ppl':>8s} {f'TTFT@{prompt}':>8s} {'p50 ms':>7s} {'p90 ms':>7s} "
          f"{'tok/s@8':>7s} {'KV B/tok':>8s} {'MB':>6s} {'peak MB':>7s}")
    for e in m["models"]:
        lat = {r["batch"]: r for r in e.get("latency", [])}
        one, eight = lat.get(1), lat.get(8)
        mem = (one or {}).get("peak_memory_mb")
        print(f"{e['name']:40s} {e['flops'] / 1e6:9.3f} {e['test_perplexity']:8.2f} {_ttft(one, prompt)} "
              + (f"{one['p50_ms']:7.3f} {one['p90_ms']:7.3f}" if one else f"{'-':>7s} {'-':>7s}")
              + (f" {eight['tokens_per_s']:7.0f}" if eight and "tokens_per_s" in eight else f" {'-':>7s}")
              + f" {e['kv_bytes_per_token']:8d} {e['bytes'] / 1e6:6.2f} "
              + (f"{mem:7.1f}" if mem is not None else f"{'-':>7s}"))
    for r in m.get("rejected", []):
        print(f"  left out: {r['name']}: {r['reason']}")
