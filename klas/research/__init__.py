"""Research code, apart from the shipped path: the reproduction study, method comparisons at equal cost, the
alternative selection metrics, the stitched early exit and the HTML report. Nothing under ``klas/stages`` imports
from here: the baseline metrics and selection methods register themselves with the stages (``register_all``)."""
from __future__ import annotations


def register_all() -> None:
    """Register every research plug-in with the stages: the baseline metric tables of the scores stage (mse, cka,
    ce, dm) and the comparison selection methods (those tables, and the fitted tlm, fula). Idempotent and cheap
    after the first call; call it before a config naming one of them is checked or run."""
    from klas.research import metrics

    metrics.register()
