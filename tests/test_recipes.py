"""Finetuning recipes (klas.stages.s4_finetune): shared (SN-Net supernetwork, with anchor lr scale and several
configurations per step), independent (each stitch its own anchor copies), frozen (stitch layer + LoRA), distillation
from an untouched anchor; the anchors are never changed, trained networks reload equal, an independent run resumes
exactly after a crash, the artifact digest covers the per-configuration files, LoRA networks export."""
import copy

import pytest
import torch

from _stitch_helpers import ddp_and_single, small_finetune_cfg, one_thread, tiny_family, write_selection  # noqa: F401  (autouse fixture)
from klas import config as kconfig
from klas.data import load_dataset
from klas.errors import KlasError
from klas.io import load_tensors
from klas.stages import s4_finetune as s4
from _stitch_helpers import finetune
from klas import stitched
from klas.losses import distill_loss, frozen_teachers
from klas.metrics import network_score
from klas.stages.s4_finetune import FinetuneArtifact, FinetuneConfig
from klas.stitched import limit_stitches, load_stitched, load_stitched_models, read_selection
from klas.tasks import get_task

TASK = get_task("image-classification")
from klas.stitch import LoRALinear, StitchConfig, StitchLayer, add_lora, merge_lora

STITCHES = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-16", 0), ("tv-16", 0, "tv-32", 2)]
X = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def _cfg(**kw):
    return small_finetune_cfg(**{"val_images": 64, **kw})


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def _state(fam):
    return {f"{v.name}/{k}": t.clone() for v in fam for k, t in v.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _capture(monkeypatch):
    """Record a deep copy of every network the per-stitch recipes finish training, by config key."""
    trained = {}
    save = s4.stitch_tensors_to_save  # the stage's own reference (klas.stitched's function)

    def spy(net, recipe):
        trained[net.config.key] = copy.deepcopy(net).eval()
        return save(net, recipe)

    monkeypatch.setattr(s4, "stitch_tensors_to_save", spy)
    return trained


@pytest.mark.parametrize("recipe", ["independent", "frozen"])
def test_per_stitch_recipes_train_reload_equal_and_leave_anchors_untouched(tmp_path, fam, monkeypatch, recipe):
    sel = write_selection(tmp_path / "sel.json", STITCHES[:2])
    before = _state(fam)
    trained = _capture(monkeypatch)
    art = finetune(tmp_path / "run", _cfg(recipe=recipe), seed=0, selection_path=sel, family=fam,
                   progress=False)
    assert _same(before, _state(fam))  # the family handed in is never trained
    assert art.recipe == recipe and art.images_seen == 2 * 6 * 32  # 2 stitches x 6 steps x 32 images each
    rows = {r["key"]: r for r in art.configs}
    assert [r["samples"] for r in art.configs] == [0, 0, 6, 6] and [r["trained"] for r in art.configs] == [
        False, False, True, True]
    # anchors.safetensors holds the untouched anchors; the anchor configurations are the untouched anchors
    anchors = load_tensors(tmp_path / "run" / "finetune" / "anchors.safetensors")
    assert all(torch.equal(t, before[k]) for k, t in anchors.items())
    for name in ("tv-8", "tv-32"):
        net = load_stitched(tmp_path / "run", StitchConfig.anchor(name))
        with torch.no_grad():
            torch.testing.assert_close(net(X), fam[name](X), rtol=0, atol=0)
        assert rows[name]["val_acc"] == rows[name]["val_acc_init"] and rows[name]["weights"] is None
    init = load_tensors(tmp_path / "run" / "finetune" / "init_stitch_layers.safetensors")
    for key, sn in trained.items():
        r = rows[key]
        assert r["weights"] == f"configs/{r['index']}.safetensors"
        loaded = load_stitched(tmp_path / "run", key, merge_lora=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(X), sn(X), rtol=0, atol=0)  # reloads to exactly what was trained
            merged = load_stitched(tmp_path / "run", key)
            assert not any(isinstance(m, LoRALinear) for m in merged.modules())
            torch.testing.assert_close(merged(X), sn(X), rtol=1e-5, atol=1e-5)
        assert not torch.equal(init[f"{r['stitch']}/linear.weight"], sn.layer.linear.weight)
        assert r["val_acc"] == network_score(TASK, loaded, load_dataset("fashion-mnist", "val").subset(64))
        saved = load_tensors(tmp_path / "run" / "finetune" / r["weights"])
        if recipe == "frozen":
            # only the stitch layer and the adapters train; every anchor weight is the untouched one
            assert set(saved) == {n for n, p in sn.named_parameters() if p.requires_grad}
            assert all(k.startswith("layer.") or k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in saved)
            loras = [m for m in sn.modules() if isinstance(m, LoRALinear)]
            c = sn.config
            assert len(loras) == 4 * (fam[c.target].depth - c.j - 1) and all(m.lora_B.abs().sum() > 0 for m in loras)
            for part, view in (("src", fam[c.source]), ("tgt", fam[c.target])):
                own = {k: t for k, t in getattr(sn, part).model.state_dict().items() if "lora_" not in k}
                assert _same(own, view.model.state_dict())
        else:
            # the anchors' copies trained: source blocks <= i and target blocks > j moved, the rest is not stored
            c = sn.config
            assert f"src.model.blocks.{c.i}.mlp.fc2.weight" in saved and f"tgt.model.head.weight" in saved
            assert f"src.model.blocks.{c.i + 1}.mlp.fc2.weight" not in saved and "src.model.head.weight" not in saved
            assert not torch.equal(saved["tgt.model.head.weight"], before[f"{c.target}/head.weight"])
    # the evaluation stage's view: every configuration through the same interface as the supernetwork
    net, meta = load_stitched_models(tmp_path / "run")
    assert isinstance(net, stitched.StandaloneStitches) and net.indices == [0, 1, 2, 3] and meta.recipe == recipe
    with torch.no_grad():
        torch.testing.assert_close(net.net(2)(X), trained[net.configs[2].key](X), rtol=1e-5, atol=1e-5)
    # init state: pretrained anchors and the least-squares layers, as for the shared recipe
    net0, _ = load_stitched_models(tmp_path / "run", "init", family=copy.deepcopy(fam))
    assert isinstance(net0, stitched.StitchedModels) and not isinstance(net0, stitched.StandaloneStitches)


def test_frozen_stitch_exports(tmp_path, fam):
    """A LoRA network (merged or not) goes through the exporter's pruning and traces to ONNX with parity."""
    from klas.export import export_onnx, standalone
    import onnxruntime as ort

    src, tgt = fam[0], fam[2]
    layer = StitchLayer(src.feature_dim(1), tgt.feature_dim(1))
    net = stitched.trainable_stitch(src, tgt, StitchConfig(src.name, 1, tgt.name, 1), layer, "frozen", 2, 4.0,
                              torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    net.eval()
    ref = net(X)
    module = standalone(net, X[:2])
    assert sum(isinstance(m, LoRALinear) for m in module.modules()) == 4 * 2  # 2 target blocks after j=1
    model, info = export_onnx(module, X[:2], 18)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    assert abs(out - ref.detach().numpy()).max() < 1e-4
    merged = copy.deepcopy(net)
    assert merge_lora(merged) == 8
    torch.testing.assert_close(merged(X), ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in standalone(merged, X[:2]).parameters()) < sum(
        p.numel() for p in module.parameters())


def test_lora_starts_as_identity_and_skips_conv_blocks(fam):
    tgt = copy.deepcopy(fam[1])
    with torch.no_grad():
        ref = tgt(X)
    names = add_lora(tgt, 2, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    assert names == [f"blocks.{b}.{m}" for b in (2, 3) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    with torch.no_grad():
        torch.testing.assert_close(tgt(X), ref, rtol=0, atol=0)  # B = 0: the function is unchanged
    keys = tgt.model.state_dict().keys()
    assert "blocks.2.attn.qkv.weight" in keys and "blocks.2.attn.qkv.lora_A" in keys  # the base keys are kept
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))

    class ConvView:  # a stand-in for a ResNet view: blocks without Linear layers get no adapter
        blocks = [conv]
        model = conv
    assert add_lora(ConvView, 0, 2, 2.0) == []


def test_shared_recipe_options(tmp_path, fam):
    sel = write_selection(tmp_path / "sel.json", STITCHES)
    start = _state(fam)
    # anchors at lr scale 0: only the stitch layers move (the anchors' weight decay is scaled to 0 as well)
    art = finetune(tmp_path / "frozen", _cfg(anchor_lr_scale=0.0, val_images=0), seed=0, selection_path=sel,
                   family=copy.deepcopy(fam), progress=False)
    anchors = load_tensors(tmp_path / "frozen" / "finetune" / "anchors.safetensors")
    assert all(torch.equal(anchors[k], start[k]) for k in anchors)
    init = load_tensors(tmp_path / "frozen" / "finetune" / "init_stitch_layers.safetensors")
    final = load_tensors(tmp_path / "frozen" / "finetune" / "stitch_layers.safetensors")
    assert all(not torch.equal(init[k], final[k]) for k in init if k.endswith("weight"))
    assert art.images_seen == 6 * 32 and art.history[-1]["lr"] > 0
    # anchors at half the rate: they move, by less than at the full rate (same seed, same batches)
    half = finetune(tmp_path / "half", _cfg(anchor_lr_scale=0.5, val_images=0), seed=0, selection_path=sel,
                    family=copy.deepcopy(fam), progress=False)
    full = finetune(tmp_path / "full", _cfg(val_images=0), seed=0, selection_path=sel,
                    family=copy.deepcopy(fam), progress=False)
    assert [h["lr"] for h in half.history] == [h["lr"] for h in full.history]  # the stitch layers' rate
    k = "tv-32/blocks.3.mlp.fc2.weight"
    moved = {d: (load_tensors(tmp_path / d / "finetune" / "anchors.safetensors")[k] - start[k]).abs().sum()
             for d in ("half", "full")}
    assert 0 < moved["half"] < moved["full"]
    # several configurations per step: each step trains configs_per_step of them on its batch
    two = finetune(tmp_path / "two", _cfg(configs_per_step=2, val_images=0), seed=0, selection_path=sel,
                   family=copy.deepcopy(fam), progress=False)
    counts = [r["samples"] for r in two.configs]
    assert sum(counts) == 12 and max(counts) - min(counts) <= 1 and two.images_seen == 12 * 32
    # at most N stitches, spread over FLOPs: the cheapest and the dearest
    lim = finetune(tmp_path / "lim", _cfg(max_stitches=2, val_images=0), seed=0, selection_path=sel,
                   family=copy.deepcopy(fam), progress=False)
    assert [r["key"] for r in lim.configs if not r["anchor"]] == [c.key for c in limit_stitches(
        read_selection(sel, fam), 2, fam) if not c.is_anchor] and lim.selection["n_finetuned"] == 2


def test_limit_stitches_spreads_over_flops(fam, tmp_path):
    from klas.families import stitched_flops

    configs = read_selection(write_selection(tmp_path / "s.json", STITCHES), fam)
    fl = {c: stitched_flops(fam[c.source], c.i, fam[c.target], c.j) for c in configs if not c.is_anchor}
    pos = {c: (f - fam[c.source].flops) / (fam[c.target].flops - fam[c.source].flops) for c, f in fl.items()}
    for n in (1, 2):
        middle = [c for c in fl if 0.15 <= pos[c] <= 0.85]
        pool = sorted(middle if len(middle) >= n else fl, key=lambda c: (fl[c], c.key))
        want = {pool[round(m * (len(pool) - 1) / max(n - 1, 1))] for m in range(n)}
        got = limit_stitches(configs, n, fam)
        assert got[:2] == configs[:2] and set(got[2:]) == want  # anchors first, then the chosen stitches
    assert limit_stitches(configs, None, fam) == configs and limit_stitches(configs, 3, fam) == configs


def test_distillation_loss_and_teacher(tmp_path, fam):
    cfg = _cfg(distill="target", distill_weight=1.0, distill_temperature=2.0)
    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    def loss_of(logits, y, teacher, cfg):  # the stage's combination of the task's loss and distillation term
        return distill_loss(TASK, logits, y, teacher, label_smoothing=cfg.label_smoothing,
                            weight=cfg.distill_weight, temperature=cfg.distill_temperature)

    loss = loss_of(logits, y, logits.detach().clone(), cfg)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and logits.grad.abs().max() < 1e-6  # teacher == student: nothing to learn
    assert loss_of(logits, y, None, cfg).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item())
    half = loss_of(logits, y, torch.randn(6, 10), _cfg(distill="target", distill_weight=0.5))
    assert half.item() > 0
    # in the shared supernetwork an anchor configuration's target is itself: at step 0 the untouched teacher and
    # the student agree, so weight 1 gives zero loss and zero gradients
    f = copy.deepcopy(fam)
    net = stitched.StitchedModels(f, [StitchConfig.anchor("tv-16")])
    teacher = frozen_teachers(f, {"tv-16"}, torch.device("cpu"))["tv-16"]
    net.eval()  # (no stochastic layers in the tiny ViTs; eval to be explicit)
    x = torch.randn(8, 1, 28, 28)
    env = s4._Run(cfg=cfg, task=TASK, seed=0, train=None, val=None, spe=1, total=1, out=tmp_path, fp="", rank=0,
                  world=1, device=torch.device("cpu"), use_amp=False, progress=False, restart=False, on_step=None,
                  teachers={})
    loss = s4._accumulate(net, x, torch.randint(0, 10, (8,)), 0, env, teacher)
    assert abs(loss.item()) < 1e-5
    assert max(p.grad.abs().max().item() for p in net.parameters() if p.grad is not None) < 1e-5
    # end to end: the teachers are recorded, and a bad selector is one line
    sel = write_selection(tmp_path / "sel.json", STITCHES[:1])
    art = finetune(tmp_path / "run", _cfg(recipe="independent", distill="largest", val_images=0,
                                                   epochs=1), seed=0, selection_path=sel, family=fam, progress=False)
    assert [r["teacher"] for r in art.configs] == [None, None, "tv-32"]
    with pytest.raises(KlasError, match="--distill 'tv-99': expected none, target, largest or an anchor"):
        finetune(tmp_path / "bad", _cfg(distill="tv-99"), seed=0, selection_path=sel, family=fam,
                 progress=False)


def test_teacher_memo_computes_each_teacher_once_and_changes_nothing(tmp_path, fam, monkeypatch):
    """Independent recipe, 3 stitches, two of them distilled from tv-32 (with tv-16's between them), augmentation
    and 2 micro-batches on: with the teachers' outputs kept for the next stitch (``TeacherMemo``) the trained
    weights, losses and val scores are bit for bit those of recomputing them every step, and tv-32 runs forward
    for one stitch's steps only."""
    from klas.losses import TeacherMemo

    sel = write_selection(tmp_path / "sel.json", STITCHES)
    cfg = _cfg(recipe="independent", distill="target", distill_weight=0.5, accum_steps=2)
    runs, calls = {}, {}
    for name, limit in (("memo", 512 << 20), ("plain", 0)):
        monkeypatch.setattr(s4, "TEACHER_MEMO_BYTES", limit)
        computed = calls.setdefault(name, [])

        class Counting(TeacherMemo):  # counts the teacher's own forward passes
            def __init__(self, teacher, users, limit, computed=computed):
                def run(x):
                    computed.append(teacher.name)
                    return teacher(x)

                super().__init__(run, users, limit)

        monkeypatch.setattr(s4, "TeacherMemo", Counting)
        runs[name] = finetune(tmp_path / name, cfg, seed=0, selection_path=sel, family=fam, progress=False)
    memo, plain = runs["memo"], runs["plain"]
    for r in plain.configs:
        if r["weights"]:
            assert _same(load_tensors(tmp_path / "plain" / "finetune" / r["weights"]),
                         load_tensors(tmp_path / "memo" / "finetune" / r["weights"]))
    assert [h["loss"] for h in memo.history] == [h["loss"] for h in plain.history]
    assert [r["val_acc"] for r in memo.configs] == [r["val_acc"] for r in plain.configs]
    steps = cfg.epochs * cfg.steps_per_epoch * cfg.accum_steps  # teacher calls per stitch
    assert calls["plain"].count("tv-32") == 2 * steps and calls["memo"].count("tv-32") == steps
    assert calls["memo"].count("tv-16") == calls["plain"].count("tv-16") == steps


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_at", [9, 2])
def test_independent_resume_after_crash_equals_uninterrupted(tmp_path, fam, crash_at):
    """2 stitches x 6 steps (checkpoints at steps 2, 3, 4 and 6 of each): a crash in the second stitch resumes it
    at its last checkpoint (the first is finished and skipped), one in the first stitch before any checkpoint
    retrains it; either ends with the uninterrupted run's weights, bit for bit."""
    sel = write_selection(tmp_path / "sel.json", STITCHES[:2])
    cfg = _cfg(recipe="independent", ckpt_every=2, distill="target", distill_weight=0.3)
    whole = finetune(tmp_path / "whole", cfg, seed=0, selection_path=sel, family=fam, progress=False)

    def crash(step):
        if step == crash_at:
            raise Crash

    with pytest.raises(Crash):
        finetune(tmp_path / "cut", cfg, seed=0, selection_path=sel, family=fam, progress=False,
                 on_step=crash)
    out = tmp_path / "cut" / "finetune"
    assert not (out / "finetune.json").exists()
    assert (out / "configs" / "2.safetensors").is_file() == (crash_at > 6)
    resumed = finetune(tmp_path / "cut", cfg, seed=0, selection_path=sel, family=fam, progress=False)
    for r in whole.configs:
        if r["weights"]:
            assert _same(load_tensors(tmp_path / "whole" / "finetune" / r["weights"]), load_tensors(out / r["weights"]))
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]
    assert [r["val_acc"] for r in whole.configs] == [r["val_acc"] for r in resumed.configs]
    assert not (out / "checkpoints").exists()
    # other settings: refused, unless restart; the artifact's digest covers the per-configuration files
    with pytest.raises(KlasError, match="other settings"):
        finetune(tmp_path / "cut", _cfg(recipe="independent", lr=1e-2), seed=0, selection_path=sel,
                 family=fam, progress=False)
    d = FinetuneArtifact.digest(out)
    assert d is not None and FinetuneArtifact.load(out).recipe == "independent"
    (out / "configs" / "3.safetensors").write_bytes((out / "configs" / "3.safetensors").read_bytes() + b" ")
    assert FinetuneArtifact.digest(out) != d
    (out / "configs" / "3.safetensors").unlink()
    assert FinetuneArtifact.digest(out) is None
    with pytest.raises(KlasError, match="3.safetensors: missing"):
        FinetuneArtifact.load(out)


def test_recipe_settings_are_config_fields(tmp_path):
    cfg = kconfig.load_config(None, sets=["finetune.recipe=frozen", "finetune.distill=target",
                                          "finetune.max_stitches=4", "finetune.lora_rank=8"])
    ft = cfg.finetune
    assert (ft.recipe, ft.distill, ft.max_stitches, ft.lora_rank) == ("frozen", "target", 4, 8)
    assert kconfig.load_config(None).finetune == FinetuneConfig()  # the defaults live on the dataclass only
    for bad, msg in (("finetune.recipe=joint", "expected one of shared, independent, frozen"),
                     ("finetune.distill_weight=2", "expected <= 1"), ("finetune.configs_per_step=0", ">= 1")):
        with pytest.raises(KlasError, match=msg):
            kconfig.load_config(None, sets=[bad])


def test_torchrun_per_stitch_recipe_matches_single_process(tmp_path):
    """The frozen recipe under two gloo ranks (each stitch wrapped in DDP in turn) ends with the single-process
    stitch and LoRA weights (augmentation off: it is drawn per shard)."""
    import json

    sel = write_selection(tmp_path / "sel.json", STITCHES[:2])
    kw = dict(recipe="frozen", epochs=1, steps_per_epoch=4, batch_size=32, train_subset=256, val_images=0,
              augment=False, lr=3e-3)
    ddp_and_single(tmp_path, sel, kw)
    rec = json.loads((tmp_path / "ddp" / "finetune" / "finetune.json").read_text())
    assert rec["world_size"] == 2 and rec["recipe"] == "frozen"
    for r in rec["configs"]:
        if r["weights"]:
            a = load_tensors(tmp_path / "single" / "finetune" / r["weights"])
            b = load_tensors(tmp_path / "ddp" / "finetune" / r["weights"])
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
