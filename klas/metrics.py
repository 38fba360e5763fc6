"""The one home of klas's figures of merit: Pareto fronts, the AUC of the accuracy-vs-FLOPs staircase, the paired
sign test the admission rule uses, and cascade routing. Task-neutral: a *prediction* and a per-sample *quality* come
from the task (``klas.tasks``); these functions only compare and count.
"""
from __future__ import annotations

import torch

from klas.errors import KlasError

AUC_DEFINITION = ("AUC = integral over x in [0,1] of A(x), A(x) = max test accuracy (fraction) among configurations "
                  "with normalized FLOPs <= x (0 if none), normalized FLOPs = (F - F_min) / (F_max - F_min) with "
                  "F_min / F_max the FLOPs of the family's smallest / largest anchor (values clipped to [0, 1])")


# --- metrics ------------------------------------------------------------------------------------------------------

def pareto_mask(flops: list[float], acc: list[float]) -> list[bool]:
    """True for every point no other point dominates (no more FLOPs and no less accuracy, one of them strictly)."""
    order = sorted(range(len(flops)), key=lambda k: (flops[k], -acc[k]))
    mask = [False] * len(flops)
    best = float("-inf")
    k = 0
    while k < len(order):
        # points of equal FLOPs: only those with the group's top accuracy can survive
        group = [order[k]]
        while k + len(group) < len(order) and flops[order[k + len(group)]] == flops[order[k]]:
            group.append(order[k + len(group)])
        top = max(acc[g] for g in group)
        if top > best:
            for g in group:
                mask[g] = acc[g] == top
            best = top
        k += len(group)
    return mask


def normalize_flops(flops: float, f_min: float, f_max: float) -> float:
    """FLOPs mapped to [0, 1] between the smallest and the largest anchor (not clipped)."""
    if not f_max > f_min:
        raise KlasError(f"FLOPs range [{f_min}, {f_max}]: the largest anchor must cost more than the smallest")
    return (flops - f_min) / (f_max - f_min)


def staircase(xs: list[float], acc: list[float], x: float) -> float:
    """A(x): the best accuracy among points with normalized FLOPs <= x (0 when none)."""
    return max((a for xi, a in zip(xs, acc) if xi <= x), default=0.0)


def auc(flops: list[float], acc_percent: list[float], f_min: float, f_max: float) -> float:
    """Area under the Pareto staircase of accuracy (fraction) over normalized FLOPs in [0, 1] (module docstring)."""
    if len(flops) != len(acc_percent):
        raise ValueError("flops and accuracies differ in length")
    pts = sorted((min(max(normalize_flops(f, f_min, f_max), 0.0), 1.0), a / 100.0) for f, a in zip(flops, acc_percent))
    area, best = 0.0, 0.0
    for k, (x, a) in enumerate(pts):
        best = max(best, a)
        x_next = pts[k + 1][0] if k + 1 < len(pts) else 1.0
        area += best * (x_next - x)
    return area


def sign_test(cand: torch.Tensor, ref: torch.Tensor) -> dict:
    """Paired one-sided exact sign test that a candidate's per-sample quality beats a reference's on the same samples
    (McNemar's test where quality is right/wrong): b = samples where the candidate is better, c = where the reference
    is; p = P(Binomial(b + c, 1/2) >= b)."""
    from scipy.stats import binomtest

    cand, ref = cand.double(), ref.double()
    b, c = int((cand > ref).sum()), int((cand < ref).sum())
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return dict(only_candidate=b, only_reference=c, p_value=float(p))


def cascade_outputs(small, large, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade's (prediction, deferred mask): the small model's answer unless its confidence is below
    ``threshold``, then the large model's."""
    deferred = small[1] < threshold
    mask = deferred.view(-1, *([1] * (small[0].dim() - 1)))  # predictions may have more than one value per sample
    return torch.where(mask, large[0], small[0]), deferred


def cascade_thresholds(conf_val: torch.Tensor) -> list[float]:
    """The thresholds a cascade is tried at: the 5 %, 10 %, ..., 95 % quantiles of the cheaper model's val
    confidence, rounded to 4 digits."""
    return sorted({round(float(q), 4) for q in torch.quantile(conf_val.float(), torch.linspace(0.05, 0.95, 19))})


@torch.no_grad()
def network_score(task, net: torch.nn.Module, data, batch_size: int = 500, device: torch.device | None = None,
                 sharded: bool = False) -> float:
    """The task's metric (percent) of one network on a split. ``sharded``: under torchrun each rank scores its
    shard of every batch and the per-sample qualities are summed (every rank gets the whole-split figure)."""
    from klas import distributed as kd
    from klas.data import batches

    di = kd.info() if sharded else kd.DistInfo()
    was = net.training
    net.eval()
    total = torch.zeros((), dtype=torch.float64)
    for x, y in batches(data, batch_size, rank=di.rank, world_size=di.world):
        if device is not None:
            x, y = x.to(device), y.to(device)
        total += task.quality(task.predict(net(x), y)[0], y).double().sum().cpu()
    net.train(was)
    if di.distributed:
        kd.all_reduce_([total], "quality sums")
    return 100.0 * float(total) / max(len(data), 1)
