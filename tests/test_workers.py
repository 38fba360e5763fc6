"""Jobs in forked single-thread workers (klas.workers) and the finetune stage's stitches trained two at a time: the
same weights, losses and val scores as one after the other in one process, bit for bit; a worker's failure is a
one-line error and the stitches it finished are kept for the relaunch."""
import errno
import os

import pytest
import torch

from _stitch_helpers import finetune, one_thread, small_finetune_cfg, tiny_family, write_selection  # noqa: F401
from klas import workers
from klas.errors import KlasError
from klas.io import load_tensors
from klas.stages import s4_finetune as s4

STITCHES = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-16", 0), ("tv-16", 0, "tv-32", 2)]


class Bar:
    def __init__(self):
        self.n, self.postfix = 0, None

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kw):
        self.postfix = kw


def _square_sum(item, progress):
    g = torch.Generator().manual_seed(item)
    x = torch.randn(257, 33, generator=g, dtype=torch.float64)
    progress.update(item)
    progress.set_postfix(item=item)
    return (item, torch.get_num_threads(), float((x @ x.T).sum()))


def test_run_forked_gives_the_in_process_results_and_forwards_progress():
    items = [5, 1, 4, 2, 3]
    bar = Bar()
    got = workers.run_forked(_square_sum, items, 2, bar)
    want = {i: _square_sum(i, Bar()) for i in items}
    assert set(got) == set(items)
    assert all(got[i][0] == i and got[i][2] == want[i][2] and got[i][1] == 1 for i in items)  # one thread each
    assert bar.n == sum(items) and bar.postfix["item"] in items


def _fails(item, progress):
    if item == 2:
        raise KlasError("config.toml: [x] y: expected z")
    if item == 3:
        raise ValueError("boom")
    if item == 4:
        os._exit(7)
    if item == 5:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y.onnx")
    return item


def test_run_forked_failures_reach_the_parent_as_raised():
    with pytest.raises(KlasError, match=r"^config.toml: \[x\] y: expected z$"):
        workers.run_forked(_fails, [1, 2], 2)
    with pytest.raises(ValueError, match="^boom") as e:  # the same exception; where it came from in its cause
        workers.run_forked(_fails, [3, 1], 2)
    assert "(in the worker process of job 3)" in e.value.__notes__
    cause = e.value.__cause__
    assert isinstance(cause, workers.RemoteTraceback) and 'raise ValueError("boom")' in str(cause)
    with pytest.raises(OSError) as e:  # an OSError reads as it would in-process (the CLI's one line)
        workers.run_forked(_fails, [5], 2)
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/x/y.onnx"
    with pytest.raises(KlasError, match="worker process ended \\(exit code 7\\)"):
        workers.run_forked(_fails, [4, 1], 2)


def test_worker_count_follows_jobs_request_and_memory(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 4)
    monkeypatch.setattr(workers, "can_fork", lambda: True)
    monkeypatch.setattr(workers, "available_memory", lambda: 10 << 30)
    assert workers.worker_count(3) == 3 and workers.worker_count(9) == 4 and workers.worker_count(1) == 1
    assert workers.worker_count(9, requested=2) == 2 and workers.worker_count(9, requested=1) == 1
    assert workers.worker_count(9, job_bytes=3 << 30) == 2  # 80 % of 10 GiB holds two jobs of 3 GiB
    assert workers.worker_count(9, job_bytes=20 << 30) == 1
    monkeypatch.setattr(workers, "can_fork", lambda: False)
    assert workers.worker_count(9) == 1


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def _cfg(recipe, n):
    return small_finetune_cfg(recipe=recipe, val_images=64, distill="target", distill_weight=0.5, workers=n)


def _same_runs(a, b, da, db):
    for r in a.configs:
        if r["weights"]:
            ta, tb = load_tensors(da / "finetune" / r["weights"]), load_tensors(db / "finetune" / r["weights"])
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [r["val_acc"] for r in a.configs] == [r["val_acc"] for r in b.configs]


@pytest.mark.parametrize("recipe", ["independent", "frozen"])
def test_stitches_in_two_workers_train_as_in_one_process(tmp_path, fam, recipe, monkeypatch):
    sel = write_selection(tmp_path / "sel.json", STITCHES)
    forks = []
    real = s4.run_forked
    monkeypatch.setattr(s4, "run_forked", lambda *a, **k: forks.append(a[2]) or real(*a, **k))
    one = finetune(tmp_path / "one", _cfg(recipe, 1), seed=0, selection_path=sel, family=fam, progress=False)
    assert forks == []
    two = finetune(tmp_path / "two", _cfg(recipe, 2), seed=0, selection_path=sel, family=fam, progress=False)
    assert forks == [2]
    _same_runs(one, two, tmp_path / "one", tmp_path / "two")


def test_a_failed_worker_keeps_the_finished_stitches_and_the_relaunch_ends_as_one_run(tmp_path, fam, monkeypatch):
    sel = write_selection(tmp_path / "sel.json", STITCHES)
    cfg = _cfg("independent", 2)
    whole = finetune(tmp_path / "whole", cfg, seed=0, selection_path=sel, family=fam, progress=False)
    real = s4._train_stitch

    def fail_on_4(net, k, *a, **kw):
        if k == 4:
            raise KlasError("stitch 4: simulated failure")
        return real(net, k, *a, **kw)

    monkeypatch.setattr(s4, "_train_stitch", fail_on_4)
    with pytest.raises(KlasError, match="^stitch 4: simulated failure$"):
        finetune(tmp_path / "cut", cfg, seed=0, selection_path=sel, family=fam, progress=False)
    out = tmp_path / "cut" / "finetune"
    assert not (out / "finetune.json").exists() and not (out / "configs" / "4.safetensors").exists()
    monkeypatch.setattr(s4, "_train_stitch", real)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "configs").glob("*.safetensors")}
    resumed = finetune(tmp_path / "cut", cfg, seed=0, selection_path=sel, family=fam, progress=False)
    assert all((out / "configs" / f).stat().st_mtime_ns == t for f, t in kept.items())  # not trained again
    _same_runs(whole, resumed, tmp_path / "whole", tmp_path / "cut")
