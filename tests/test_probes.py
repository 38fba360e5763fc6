"""ProbeNet: joint training equals independent training; artifacts and exact resume; one-line errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import klas
from klas.data import FASHION_MNIST, ImageSet, batches
from klas.errors import KlasError
from klas.io import load_tensors
from klas.rundir import RunDir
from _stitch_helpers import probes
from test_lm_pipeline import lm_family  # noqa: F401  (the fixture: a tiny user-style Llama family)
from klas.stages.s1_probes import ProbesConfig, init_probe, load_probes, probe_seed, train_probe_nets


@pytest.fixture(scope="module")
def family(one_thread):
    torch.manual_seed(1234)
    return klas.create_family("fmnist-deit", anchors=["fmnist-deit-ti", "fmnist-deit-s"])  # two anchors: fast


def _random_set(n: int, gen: torch.Generator) -> ImageSet:
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return ImageSet(FASHION_MNIST, "train", images, torch.randint(0, 10, (n,), generator=gen))


def test_joint_training_equals_independent_training(family, rng):
    data = _random_set(100, rng)  # 100 = 3 x 32 + 4: a ragged last batch
    cfg = ProbesConfig(epochs=2, batch_size=32, lr=2e-2, weight_decay=0.01, stat_samples=70)
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    before = {v.name: {k: t.clone() for k, t in v.model.state_dict().items()} for v in family}
    nets = train_probe_nets(family, data, cfg, seed, progress=False)
    for v in family:  # anchors stay frozen
        assert all(torch.equal(t, before[v.name][k]) for k, t in v.model.state_dict().items())
    view = family[1]
    steps = -(-len(data) // cfg.batch_size)
    for k in (0, 5, view.depth - 1):
        # independent reference: its own layer, optimizer and forward through blocks 0..k only
        lin = nn.Linear(view.feature_dim(k), 10)
        init_probe(lin, probe_seed(seed, view.name, k))
        start = lin.weight.detach().clone()
        with torch.no_grad():  # the standardization statistics, over the first stat_samples images
            f = view.forward_blocks(view.forward_stem(data.normalize(data.images[:cfg.stat_samples])), 0, k + 1)
            f = f.double().mean(dim=1)
            mean, std = f.mean(0), f.std(0, unbiased=False) + 1e-6
        opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for epoch in range(cfg.epochs):
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            for s, (x, y) in enumerate(batches(data, cfg.batch_size, shuffle=True, gen=gen)):
                for g in opt.param_groups:  # cosine decay to zero over the run, no warm-up
                    g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch * steps + s) / (cfg.epochs * steps)))
                with torch.no_grad():
                    h = view.forward_blocks(view.forward_stem(x), 0, k + 1).mean(dim=1)
                    h = ((h.double() - mean) / std).float()
                loss = F.cross_entropy(lin(h), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        w, b = nets[view.name].folded()[k]
        feats = view.forward_blocks(view.forward_stem(data.normalize(data.images[:9])), 0, k + 1).mean(dim=1)
        torch.testing.assert_close(feats @ w.T + b, nets[view.name]([feats] * (k + 1))[k].detach(), rtol=1e-4,
                                   atol=1e-4)
        joint = nets[view.name].probes[k]
        assert not torch.allclose(lin.weight, start)  # it trained
        torch.testing.assert_close(joint.weight, lin.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(joint.bias, lin.bias, rtol=1e-4, atol=1e-5)


def test_train_probes_writes_and_resumes_exactly(family, tmp_path, monkeypatch, capsys):
    cfg = ProbesConfig(epochs=2, batch_size=64, train_subset=128, val_subset=64)
    kw = dict(seed=0, key="k", progress=False)
    rec = probes(family, tmp_path / "full", cfg, **kw)
    out = tmp_path / "full" / "probes"
    for name in ("probes.safetensors", "probes.json", "probe_accuracy.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert [h["epoch"] for h in rec.history] == [1, 2]
    for v in family:
        accs = rec.final_val_acc[v.name]
        assert len(accs) == v.depth and all(0 <= a <= 100 for a in accs)
        assert len(rec.epochs_to_within_1pt[v.name]) == v.depth

    # interrupted after epoch 1 (its checkpoint written), then resumed: same weights as the uninterrupted run
    import klas.train
    real_save = klas.train.save_checkpoint

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(klas.train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        probes(family, tmp_path / "resumed", cfg, **kw)
    monkeypatch.setattr(klas.train, "save_checkpoint", real_save)
    assert not (tmp_path / "resumed" / "probes" / "probes.safetensors").exists()
    capsys.readouterr()
    rec2 = probes(family, tmp_path / "resumed", cfg, **kw)
    assert "resuming after epoch 1/2" in capsys.readouterr().out
    assert [h["epoch"] for h in rec2.history] == [1, 2]
    assert [h["val_acc"] for h in rec2.history] == [h["val_acc"] for h in rec.history]
    a = load_tensors(out / "probes.safetensors")
    b = load_tensors(tmp_path / "resumed" / "probes" / "probes.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    # a checkpoint made under another stage key (other settings upstream) is not resumed: trained from scratch
    monkeypatch.setattr(klas.train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        probes(family, tmp_path / "rekeyed", cfg, **kw)
    monkeypatch.setattr(klas.train, "save_checkpoint", real_save)
    capsys.readouterr()
    rec3 = probes(family, tmp_path / "rekeyed", cfg, **dict(kw, key="other"))
    assert "made for other inputs, starting over" in capsys.readouterr().out
    assert [h["epoch"] for h in rec3.history] == [1, 2]
    nets = load_probes(tmp_path / "full", family)
    torch.testing.assert_close(nets[family[0].name].probes[3].weight, a[f"{family[0].name}/3.weight"])


def test_bad_input_is_one_line_error(family, tmp_path):
    RunDir(tmp_path / "other", "deit")
    with pytest.raises(KlasError, match="belongs to family 'deit'"):
        probes(family, tmp_path / "other", ProbesConfig(epochs=1, train_subset=8, val_subset=8), seed=0,
               progress=False)
    RunDir(tmp_path / "empty", family.name)
    with pytest.raises(KlasError, match=r"probes\.safetensors: missing; run `klas probe` first") as e:
        load_probes(tmp_path / "empty", family)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_feature_cache_gives_the_probes_of_a_forward_per_epoch(family, tmp_path, mode, monkeypatch):
    """The probes trained on the cached block features (one frozen forward per sample) equal, bit for bit, those
    trained with a forward per epoch -- weights, per-epoch val accuracy and the anchors' head accuracy -- on a ragged
    split; the cache runs the anchors once, and a disk cache leaves no file behind."""
    from klas.stages import s1_probes

    base = dict(epochs=2, batch_size=48, train_subset=200, val_subset=70, stat_samples=64)
    off = probes(family, tmp_path / "off", ProbesConfig(**base, feature_cache="off"), seed=3)
    calls = {"n": 0}
    real = s1_probes.anchor_features

    def counted(view, x, task=None):
        calls["n"] += len(x)
        return real(view, x, task)

    monkeypatch.setattr(s1_probes, "anchor_features", counted)
    on = probes(family, tmp_path / mode, ProbesConfig(**base, feature_cache=mode, cache_mb=1024), seed=3)
    a = load_tensors(tmp_path / "off" / "probes" / "probes.safetensors")
    b = load_tensors(tmp_path / mode / "probes" / "probes.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_acc"] for h in on.history] == [h["val_acc"] for h in off.history]
    assert on.head_val_acc == off.head_val_acc
    # statistics (64 samples) + one pass over train and val, per anchor: not one pass per epoch
    assert calls["n"] == len(family) * (64 + 200 + 70)
    assert not list((tmp_path / mode / "probes").glob(".feature-cache*"))


def test_feature_cache_gives_the_lenses_of_a_forward_per_epoch(lm_family, one_thread, tmp_path, monkeypatch):
    """Language models' probes (tuned lenses over every token's stream, through ``task.probe_features``) read the
    same cache: trained on it (a memmap: cache_mb = 0) they equal, bit for bit, the lenses of a forward per epoch,
    per-epoch val perplexities included, on ragged train / val batches."""
    monkeypatch.setenv("KLAS_CACHE_DIR", str(tmp_path / "tokens"))
    from klas.config import load_config
    from klas.families import create_family

    data = load_config(lm_family["toml"]).data  # registers the user-style family
    fam = create_family("tiny-llama", pretrained=True)
    base = dict(epochs=2, batch_size=3, lr=1e-2, train_subset=16, val_subset=7, eval_batch_size=4, cache_mb=0)
    recs = {m: probes(fam, tmp_path / m, ProbesConfig(**base, feature_cache=m), seed=3, data=data)
            for m in ("off", "auto")}
    a = load_tensors(tmp_path / "off" / "probes" / "probes.safetensors")
    b = load_tensors(tmp_path / "auto" / "probes" / "probes.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(t, torch.eye(len(t))) for k, t in a.items() if k.endswith("weight"))  # it trained
    assert [h["val_acc"] for h in recs["auto"].history] == [h["val_acc"] for h in recs["off"].history]
    assert not list((tmp_path / "auto" / "probes").glob(".feature-cache*"))
