"""Supernetwork: selection input, the per-step configuration schedule, SN-Net training touching every configuration,
exact resume after a crash, reloading standalone stitched networks, DDP. (The ``klas finetune`` command is a
pipeline stage command: tests/test_pipeline.py.)"""
import copy
import json
from collections import Counter

import pytest
import torch

from _stitch_helpers import ddp_and_single, small_finetune_cfg, one_thread, tiny_family, write_selection  # noqa: F401  (autouse fixture)
from klas.errors import KlasError
from klas.io import load_tensors
from _stitch_helpers import finetune, selection_artifact
from klas.stitched import load_stitched, read_selection
from klas.train import config_at
from klas.stitch import StitchConfig

STITCHES = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-16", 0), ("tv-16", 0, "tv-32", 2)]


def _cfg(**kw):
    return small_finetune_cfg(**kw)


def _finetune(run, sel, cfg, fam, **kw):
    return finetune(run, cfg, seed=0, selection_path=sel, family=copy.deepcopy(fam), progress=False, **kw)


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def test_read_selection_validates(tmp_path, fam):
    ok = write_selection(tmp_path / "ok.json", STITCHES + [STITCHES[0]])
    cfgs = read_selection(ok, fam)
    assert cfgs[:2] == [StitchConfig.anchor("tv-8"), StitchConfig.anchor("tv-32")]
    assert cfgs[2:] == [StitchConfig(*s) for s in STITCHES]  # duplicates dropped, order kept
    bad = [([("tv-8", 1, "tv-99", 1)], "unknown anchor"), ([("tv-8", 4, "tv-32", 1)], r"i=4 must lie"),
           ([("tv-32", 1, "tv-8", 1)], "smaller to a larger"), ([("tv-8", 1, "tv-32", 4)], r"j=4"),
           ([("tv-8", 1, "tv-32", -1)], r"j=-1")]
    for stitches, msg in bad:
        with pytest.raises(KlasError, match=msg):
            read_selection(write_selection(tmp_path / "bad.json", stitches), fam)
    with pytest.raises(KlasError, match="not 'klas-test-vit'"):
        read_selection(write_selection(tmp_path / "other.json", STITCHES, family="fmnist-deit"), fam)
    (tmp_path / "broken.json").write_text('{"selected": [{"source": "tv-8"}]}')
    with pytest.raises(KlasError, match=r"broken.json: selected\[0\]"):
        read_selection(tmp_path / "broken.json", fam)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_schedule_covers_every_configuration(n):
    seed = int(torch.randint(0, 2**31, (1,)))
    steps = [config_at(s, n, seed, "balanced") for s in range(5 * n + 3)]
    # balanced: every configuration once per block of n steps, so counts differ by at most one at any prefix
    for s in range(1, len(steps) + 1):
        c = Counter(steps[:s])
        assert max(c.values()) - min(c[k] for k in range(n)) <= 1
    assert Counter(steps[:5 * n]) == {k: 5 for k in range(n)}
    assert steps == [config_at(s, n, seed, "balanced") for s in range(len(steps))]  # every rank, every resume
    uni = [config_at(s, n, seed, "uniform") for s in range(60 * n)]
    assert set(uni) == set(range(n)) and uni == [config_at(s, n, seed, "uniform") for s in range(60 * n)]


def _weights(run):
    out = {}
    for f in ("anchors.safetensors", "stitch_layers.safetensors"):
        out.update({f"{f}:{k}": v for k, v in load_tensors(run / "finetune" / f).items()})
    return out


def test_training_updates_every_configuration_and_reloads(tmp_path, fam):
    run = tmp_path / "run"
    sel = write_selection(tmp_path / "sel.json", STITCHES)
    meta = _finetune(run, sel, _cfg(val_images=64), fam)
    counts = [r["samples"] for r in meta.configs]
    assert len(counts) == 5 and sum(counts) == 6 and max(counts) - min(counts) <= 1  # balanced: all trained
    init = load_tensors(run / "finetune" / "init_stitch_layers.safetensors")
    final = load_tensors(run / "finetune" / "stitch_layers.safetensors")
    for r in meta.configs:
        if not r["anchor"]:
            assert r["samples"] >= 1 and not torch.equal(init[f"{r['stitch']}/linear.weight"],
                                                         final[f"{r['stitch']}/linear.weight"])
    start = {f"{v.name}/{k}": t for v in fam for k, t in v.model.state_dict().items()}
    anchors = load_tensors(run / "finetune" / "anchors.safetensors")
    assert set(anchors) == {k for k in start if k.split("/")[0] in ("tv-8", "tv-16", "tv-32")}
    assert all(not torch.equal(anchors[k], start[k]) for k in anchors if k.endswith("blocks.3.mlp.fc2.weight"))
    assert all(0 <= r["val_acc"] <= 100 and 0 <= r["val_acc_init"] <= 100 for r in meta.configs)
    assert (run / "finetune" / "training.png").read_bytes()[:4] == b"\x89PNG"
    # a reloaded standalone network computes what the trained supernetwork computed
    x = torch.randn(4, 1, 28, 28)
    for r in meta.configs:
        net = load_stitched(run, r["config"])
        assert net.config.key == r["key"] and not net.training
        net2 = load_stitched(run, r["key"])
        torch.testing.assert_close(net(x), net2(x), rtol=0, atol=0)
    with pytest.raises(KlasError, match="no configuration"):
        load_stitched(run, StitchConfig("tv-8", 0, "tv-32", 0))
    # the final checkpoint of a finished run: other settings refuse it, unless restart discards it
    with pytest.raises(KlasError, match="other settings"):
        _finetune(run, sel, _cfg(val_images=64, lr=1e-2), fam)
    again = _finetune(run, sel, _cfg(val_images=0, lr=1e-2), fam, restart=True)
    assert again.cfg["lr"] == 1e-2 and sum(r["samples"] for r in again.configs) == 6  # trained from step 0


class Crash(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, fam):
    sel = write_selection(tmp_path / "sel.json", STITCHES)
    cfg = _cfg(ckpt_every=2)
    whole = _finetune(tmp_path / "whole", sel, cfg, fam)

    def crash_at_5(step):
        if step == 5:  # checkpoints exist after steps 2, 3 (epoch end) and 4: step 5 is lost and redone
            raise Crash

    with pytest.raises(Crash):
        _finetune(tmp_path / "cut", sel, cfg, fam, on_step=crash_at_5)
    assert not (tmp_path / "cut" / "finetune" / "finetune.json").exists()
    resumed = _finetune(tmp_path / "cut", sel, cfg, fam)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert [h["loss"] for h in whole.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-6)
    assert [h["lr"] for h in whole.history] == [h["lr"] for h in resumed.history]
    # a different crash point (inside the first epoch, before any checkpoint) resumes to the same weights too
    with pytest.raises(Crash):
        _finetune(tmp_path / "cut2", sel, cfg, fam,
                  on_step=lambda s: (_ for _ in ()).throw(Crash()) if s == 1 else None)
    _finetune(tmp_path / "cut2", sel, cfg, fam)
    c = _weights(tmp_path / "cut2")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-6, atol=1e-7)


def test_bad_selection_is_one_line_error(tmp_path, fam):
    """The stage reads its run's selection artifact: a torn or a missing one is one line naming the file."""
    (tmp_path / "r2" / "selection").mkdir(parents=True)
    (tmp_path / "r2" / "selection" / "selection.json").write_text("{not json")
    with pytest.raises(KlasError, match=r"r2/selection/selection.json: not valid JSON"):
        finetune(tmp_path / "r2", _cfg(), family=copy.deepcopy(fam))
    with pytest.raises(KlasError, match=r"r3/selection/selection.json: missing; run the selection stage first"):
        finetune(tmp_path / "r3", _cfg(), family=copy.deepcopy(fam))


def test_torchrun_ddp_matches_single_process(tmp_path):
    """Two gloo ranks, each on its shard of every global batch, end with the single-process weights: the sampled
    configuration agrees across ranks and DDP averages the shard gradients (augmentation off: it draws per shard)."""
    sel = write_selection(tmp_path / "sel.json", STITCHES[:2])
    kw = dict(recipe="shared", distill=None, max_stitches=None, epochs=1, steps_per_epoch=4, batch_size=32,
              train_subset=256, val_images=0, augment=False, lr=3e-3)
    ddp_and_single(tmp_path, sel, kw)
    assert json.loads((tmp_path / "ddp" / "finetune" / "finetune.json").read_text())["world_size"] == 2
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
