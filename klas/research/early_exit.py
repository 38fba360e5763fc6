"""Stitched early exit (a stretch goal of issue 17): a *handoff cascade* runs the untouched small anchor A fully;
if its max softmax probability is below a threshold t, A's block-i output -- already computed on the way -- goes
through a stitched configuration's stitch layer and target blocks j+1.. and head (A[:i] -> T[j+1:]), instead of
re-running a larger model from the input (the ordinary cascade of ``klas.stages.s5_evaluation``).

Cost per image (FLOPs, the family's convention):

    extra    = flops(A[:i] -> T[j+1:]) - prefix(A, i)        prefix = A's stem + blocks 0..i
    average  = flops(A) + deferral * extra
    worst    = flops(A) + extra                              (an ordinary cascade A -> L: flops(A) + flops(L))

The handoff network equals the stitched configuration only when the configuration's source prefix is A's own,
bit for bit: true for the ``frozen`` recipe (anchors frozen; only the stitch layer and LoRA adapters on the target's
blocks after the stitch train), not for ``independent`` / ``shared`` (the source copy is finetuned). ``Handoff``
always computes the handoff network itself (A's prefix -> the configuration's suffix), so its accuracy is measured,
never borrowed from the stitched configuration's row.

Comparison at equal average cost, chosen on val and reported on test (``compare``): for each handoff operating point,
the reference -- a single network or an ordinary cascade -- with the best val accuracy among those whose val
average FLOPs is no larger than the point's; the decision is the val difference, test is only reported.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from klas.families.blockview import prefix_flops
from klas.metrics import cascade_outputs, cascade_thresholds
from klas.tasks import get_task

SPLITS = ("val", "test")
TASK = get_task("image-classification")  # (predicted class, max softmax probability): what the handoff routes on


# --- the handoff network and its cost -----------------------------------------------------------------------------

def handoff_extra_flops(source, stitched) -> int:
    """FLOPs per image a deferred image costs on top of the source anchor: the stitched configuration minus the
    source prefix it shares with the anchor = stitch layer + target blocks j+1.. + target head."""
    return int(stitched.flops - prefix_flops(source, stitched.i))


def handoff_costs(source_flops: float, extra_flops: float, deferral: float) -> tuple[float, float]:
    """(average, worst-case) FLOPs per image of a handoff cascade at a deferral rate."""
    return source_flops + deferral * extra_flops, source_flops + extra_flops


class Handoff(nn.Module):
    """The handoff network: ``source`` (a block view, the untouched anchor) stem + blocks 0..i, then the stitched
    configuration's stitch layer, target blocks j+1.. and head. Equals ``stitched`` when its source prefix is
    ``source``'s (frozen recipe); otherwise it is a different network (untouched prefix, finetuned suffix)."""

    def __init__(self, source, stitched):
        super().__init__()
        if stitched.layer is None:
            raise ValueError(f"{stitched.config.key} is an anchor, not a stitched configuration")
        if stitched.config.source != source.name:
            raise ValueError(f"{stitched.config.key} starts from {stitched.config.source}, not {source.name}")
        self.source, self.stitched = source, stitched
        self.i, self.j = stitched.i, stitched.j
        self.eval()  # an inference wrapper: eval mode, so that predictions() leaves both networks in eval mode

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.forward_blocks(self.source.forward_stem(x), 0, self.i + 1)

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the source's block-i output: stitch layer -> target blocks j+1.. -> head."""
        tgt = self.stitched.tgt
        return tgt.forward_head(tgt.forward_blocks(self.stitched.layer(h), self.j + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x))


@torch.inference_mode()
def handoff_cascade(handoff: Handoff, x: torch.Tensor, threshold: float) -> dict:
    """Run the handoff cascade as deployed: the source anchor once (keeping its block-i output), then the suffix on
    the images whose max probability is below ``threshold`` only. Returns logits (the answering model's), the
    source's logits, the deferred mask and the block-i activation."""
    src = handoff.source
    h = src.forward_stem(x)
    h_i = None
    for k, blk in enumerate(src.blocks):
        h = blk(h)
        if k == handoff.i:
            h_i = h
    small = src.forward_head(h)
    _, conf = TASK.predict(small)
    deferred = conf < threshold
    out = small.clone()
    if bool(deferred.any()):
        out[deferred] = handoff.suffix(h_i[deferred]).to(out.dtype)
    return dict(logits=out, small=small, deferred=deferred, activation=h_i)


# --- weight identity (when the handoff equals the stitched configuration) ------------------------------------------

@torch.no_grad()
def source_identity(source, stitched) -> dict:
    """Compare the stitched configuration's source copy with the untouched anchor: ``identical`` (every tensor of the
    source model equal), and the largest absolute difference over the tensors its prefix uses (stem, position and
    class tokens, blocks 0..i: every tensor not in a later block, the final norm or the head)."""
    a, b = source.model.state_dict(), stitched.src.model.state_dict()
    later = {f"{n}." for n in source.block_names[stitched.i + 1:]}
    skip = tuple(later) + ("head.", "fc_norm.", "norm.", "head_drop.")
    if a.keys() != b.keys():
        return dict(identical=False, prefix_max_abs_diff=None, prefix_tensors=0, note="different state-dict keys")
    identical = all(torch.equal(a[k], b[k]) for k in a)
    prefix = [k for k in a if not k.startswith(skip)]
    diff = max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in prefix),
               default=0.0)
    return dict(identical=identical, prefix_max_abs_diff=diff, prefix_tensors=len(prefix))


# --- operating points ---------------------------------------------------------------------------------------------

def single_point(kind: str, name: str, out: dict, labels: dict, flops: float) -> dict:
    """One network as an operating point: ``out[split] = (pred, conf)``."""
    correct = {s: TASK.quality(out[s][0], labels[s]) for s in SPLITS}
    return dict(kind=kind, name=name, flops_avg={s: float(flops) for s in SPLITS}, flops_worst=float(flops),
                deferral=None, threshold=None, **{f"{s}_acc": TASK.score(out[s][0], labels[s]) for s in SPLITS},
                _correct=correct)


def cascade_points(kind: str, name: str, small: dict, large: dict, labels: dict, small_flops: float,
                   extra_flops: float, ts: list[float] | None = None) -> list[dict]:
    """A cascade's operating points at ``ts`` (default: ``thresholds`` of the small model's val confidence):
    ``small[split]``, ``large[split]`` = (pred, conf); a deferred image costs ``extra_flops`` more (an ordinary
    cascade: the large model's FLOPs; a handoff: ``handoff_extra_flops``)."""
    ts = cascade_thresholds(small["val"][1]) if ts is None else ts
    pts = []
    for t in ts:
        p, d, correct = {}, {}, {}
        for s in SPLITS:
            pred, deferred = cascade_outputs(small[s], large[s], t)
            p[s], d[s], correct[s] = pred, float(deferred.double().mean()), TASK.quality(pred, labels[s])
        pts.append(dict(kind=kind, name=f"{name}@{t:.4f}", threshold=t,
                        flops_avg={s: handoff_costs(small_flops, extra_flops, d[s])[0] for s in SPLITS},
                        flops_worst=float(small_flops + extra_flops), deferral=d,
                        **{f"{s}_acc": TASK.score(p[s], labels[s]) for s in SPLITS}, _correct=correct))
    return pts


# --- equal-cost comparison ----------------------------------------------------------------------------------------

def equal_cost_reference(point: dict, refs: list[dict]) -> int | None:
    """Index of the reference with the best val accuracy among those whose val average FLOPs is no larger than
    ``point``'s (ties: fewer val FLOPs, then the earlier one); None when none is that cheap."""
    best = None
    for k, r in enumerate(refs):
        if r["flops_avg"]["val"] > point["flops_avg"]["val"]:
            continue
        if best is None or (r["val_acc"], -r["flops_avg"]["val"]) > (refs[best]["val_acc"], -refs[best]["flops_avg"]["val"]):
            best = k
    return best


def compare(points: list[dict], refs: list[dict]) -> tuple[list[dict], int | None]:
    """Every handoff point against its equal-cost reference (``equal_cost_reference``): the val difference (the
    decision) and the test difference (reported). Returns (one record per point, index of the point with the largest
    val difference -- ties: fewer val FLOPs, then the earlier one -- or None when no point has a reference)."""
    recs, best = [], None
    for k, p in enumerate(points):
        r = equal_cost_reference(p, refs)
        if r is None:
            recs.append(dict(point=k, reference=None))
            continue
        ref = refs[r]
        recs.append(dict(point=k, reference=r, diff_val=p["val_acc"] - ref["val_acc"],
                         diff_test=p["test_acc"] - ref["test_acc"]))
        if best is None or (recs[k]["diff_val"], -p["flops_avg"]["val"]) > (recs[best]["diff_val"],
                                                                              -points[best]["flops_avg"]["val"]):
            best = k
    return recs, best


def public(point: dict) -> dict:
    """An operating point without its per-image tensors (for JSON)."""
    return {k: v for k, v in point.items() if not k.startswith("_")}
