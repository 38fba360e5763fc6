"""Peak memory and time of the scores stage's streaming pass for language models, at the embedded family's 8k
vocabulary and at a simulated 128k one (Llama 3's 128,256), against its ``memory_mb`` bound.

    python benchmarks/lm_scores_memory.py                       # V = 8192 and 131072, bound 256 MB
    python benchmarks/lm_scores_memory.py --vocab 8192 --memory-mb 128 --tokens 4096

Each vocabulary runs in a fresh process: at 8192 the embedded family (pydoc-llama, its three trained anchors),
else two random Llama decoders (widths 64 / 128, 4 / 6 layers, the vocabulary given); their tuned lenses; and the
stage's inner loop -- ``task.score_chunks`` (lens and head logits per chunk of token rows) into
``ScoreAccumulator.update`` (all-pairs KL, entropies) -- over ``--tokens`` val tokens in batches of 8 sequences of
128. Reported: the peak resident memory above the process's memory once the models and lenses are built
(``VmHWM - VmRSS`` from /proc, Linux), the bound, the chunk size and seconds per 1k tokens, beside what one batch's
[layers + heads, tokens, V] float32 logits would take unchunked.
Writes ``benchmarks/results/lm_scores_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "lm_scores_memory.json"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(vocab: int, memory_mb: int, tokens: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from klas.families._registry import FamilyCfg, Family
    from klas.lm.lens import new_lenses, rows_per_chunk
    from klas.lm.view import CausalLMView
    from klas.stages.s1_probes import ProbesConfig
    from klas.stages.s2_scores import ScoreAccumulator
    from klas.tasks import get_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from klas.families import create_family, get_family_cfg

    if vocab == get_family_cfg("pydoc-llama").num_classes:  # the embedded family itself, as the stage sees it
        fam, which = create_family("pydoc-llama", pretrained=True), "pydoc-llama (embedded, 3 anchors)"
    else:
        views = []
        for name, d, n, kv in (("a", 64, 4, 1), ("b", 128, 6, 2)):
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n, num_attention_heads=4,
                              num_key_value_heads=kv, head_dim=d // 4, intermediate_size=2 * d,
                              max_position_embeddings=256, tie_word_embeddings=True)
            views.append(CausalLMView(LlamaForCausalLM(cfg).eval(), name, (128,)))
        fam = Family(FamilyCfg("sim", (), (128,), "text", vocab, task="causal-lm"), views)
        which = "simulated (2 random Llama anchors, widths 64 / 128, 4 / 6 layers)"
    task = get_task("causal-lm")
    nets = new_lenses(fam, ProbesConfig(), 0)
    acc = ScoreAccumulator([v.name for v in fam], [v.depth for v in fam])
    g = torch.Generator().manual_seed(0)
    base = _status("VmRSS")  # the models and lenses built, nothing scored yet
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    n_batches = max(1, tokens // (8 * 128))
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.randint(0, vocab, (8, 128), generator=g)
            for lg, _ in task.score_chunks(fam, nets, x, memory_mb):
                acc.update(lg)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    layers = sum(v.depth + 1 for v in fam)
    return dict(vocab=vocab, family=which, memory_mb=memory_mb, tokens=n_batches * 8 * 128, threads=threads,
                rows_per_chunk=rows_per_chunk(fam, memory_mb), peak_above_baseline_mb=round(peak / 2 ** 20, 1),
                within_bound=peak <= memory_mb * 2 ** 20, s_per_1k_tokens=round(wall / (n_batches * 8 * 128) * 1e3, 3),
                unchunked_batch_logits_mb=round(layers * 8 * 128 * vocab * 4 / 2 ** 20, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, action="append", default=None)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    vocabs = a.vocab or [8192, 131072]
    if a.child:
        print(json.dumps(child(vocabs[0], a.memory_mb, a.tokens, a.threads)))
        return 0
    from klas.io import save_json
    from klas_runtime.machine import machine_info

    rows = []
    for v in vocabs:
        out = subprocess.run([sys.executable, __file__, "--child", "--vocab", str(v), "--memory-mb", str(a.memory_mb),
                              "--tokens", str(a.tokens), "--threads", str(a.threads)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    save_json(dict(benchmark="lm_scores_memory", command=" ".join(["python", "benchmarks/lm_scores_memory.py"]
                                                                     + sys.argv[1:]), machine=machine_info(), rows=rows),
              OUT)
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
