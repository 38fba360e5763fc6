"""The reproduction study (``klas study``): does the KLAS paper's evidence hold on this family, and at what cost?

Sub-studies, each writing ``study_<name>_<family>.json`` and a PNG into ``out_dir`` (default benchmarks/results),
one module each:

- ``metric-outcome`` (``outcome``; paper Tab. 9-10, Tab. 1): sampled stitch configurations of one anchor pair get
  the same short stitch-level finetune; their drop from the target anchor is correlated with every metric, raw and
  FLOPs-controlled, with bootstrap CIs (``stats``), and the recovery rate of viable configurations by each metric.
- ``sensitivity`` (``sensitivity``): selection size, target-block coverage and overlap with the default selection
  over tau, bucket count and score form (selection only, cheap).
- ``auc`` (``auc``; Tab. 2): ``klas.research.compare`` of KLAS vs SN-Net vs Min-KL at equal budget over several
  seeds, mean +- spread.
- ``gain`` (``auc``): what stitching adds over the anchors' staircase, per method, and over a small sweep of budgets.
- ``cascades`` (``cascades``; App. E): small -> large anchor with the task's confidence routing, thresholds swept,
  average FLOPs vs accuracy.

Everything is seeded and resumable at the granularity of one finetuned supernetwork (``auc`` / ``gain``) or is cheap.
This package's ``__init__`` imports nothing heavy: the CLI lists the sub-studies without loading torch.
"""
from __future__ import annotations

SUBSTUDIES = ("metric-outcome", "sensitivity", "auc", "gain", "cascades")
