"""Why klas.workers forks single-thread processes: a fmnist-deit anchor's training step (forward + backward, batch
128) in one process on 1 and on all cores' threads, then in one forked single-thread process per core side by side.
Throughput (steps per second, all processes together) as a ratio against the fastest in-process form, measured in
this run on this machine; JSON with the CPU model and its vector extensions.

    python benchmarks/fork_scaling.py [--anchor fmnist-deit-b] [--steps 30] [--json benchmarks/results/fork_scaling.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def steps_per_s(model, x, y, steps: int) -> float:
    import torch

    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchor", default="fmnist-deit-b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", default="benchmarks/results/fork_scaling.json")
    a = p.parse_args()
    import torch

    import sys

    import klas
    from klas.workers import cores

    sys.path.insert(0, str(Path(__file__).parent))
    from pairwise_kl_sweep import machine_info  # the CPU model and its vector extensions

    fam = klas.create_family("fmnist-deit", pretrained=True)
    model = fam[a.anchor].model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    n = cores()
    forms = {}
    for t in sorted({1, n}):
        torch.set_num_threads(t)
        forms[f"1 process x {t} thread(s)"] = steps_per_s(model, x, y, a.steps)
    r, w = os.pipe()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            os.write(w, json.dumps(steps_per_s(model, x, y, a.steps)).encode() + b"\n")
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    each = [json.loads(line) for line in os.fdopen(r).read().splitlines()]
    forms[f"{n} forked processes x 1 thread"] = sum(each)
    best = max(v for k, v in forms.items() if k.startswith("1 process"))
    rows = [dict(form=k, steps_per_s=round(v, 3), ms_per_step=round(1e3 / v, 1),
                 vs_fastest_in_process=round(v / best, 3)) for k, v in forms.items()]
    for row in rows:
        print(f"{row['form']:34s} {row['ms_per_step']:7.1f} ms/step (all together)  "
              f"{row['vs_fastest_in_process']:.2f}x")
    out = dict(benchmark="fork_scaling", anchor=a.anchor, batch=128, steps=a.steps, cores=n,
               per_process_steps_per_s=[round(v, 3) for v in each], rows=rows, machine=machine_info("cpu"),
               command="python benchmarks/fork_scaling.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
