"""klas.train: the one schedule reproduces the anchor, probe and finetuning schedules it replaced; the Trainer's
checkpoint resumes bit-exactly; timm's no-decay grouping."""
import math

import pytest
import torch
import torch.nn as nn

import klas.train as kt
from klas.io import load_checkpoint
from klas.train import Trainer, WarmupCosineLR


def _lrs(total, warmup=0, min_lr=0.0, lr=1e-3):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupCosineLR(opt, total, warmup, min_lr)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_reproduces_the_three_loops():
    # the formulas the three loops computed by hand before klas.train (the anchor's warm-up is one epoch)
    total, warm, base = 97, 13, 2e-3
    anchor = [base * (s + 1) / warm if s < warm else
              0.5 * base * (1 + math.cos(math.pi * (s - warm) / (total - warm))) for s in range(total)]
    probes = [0.5 * base * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    lr, min_lr = 5e-4, 1e-6
    warm_ft = int(round(0.05 * total))
    finetune = [lr * (s + 1) / warm_ft if s < warm_ft else
                min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * ((s - warm_ft) / (total - warm_ft))))
                for s in range(total)]
    assert _lrs(total, warm_ft, min_lr, lr) == finetune  # the same expression: bit-identical
    # (pi * k) / n against pi * (k / n) inside the cosine: the last bits of a double, never of the float32 lr
    for new, old in ((_lrs(total, warm, lr=base), anchor), (_lrs(total, lr=base), probes)):
        assert new == pytest.approx(old, rel=1e-12, abs=0)
        assert torch.equal(torch.tensor(new, dtype=torch.float32), torch.tensor(old, dtype=torch.float32))


def test_finetune_schedule_warmup_then_cosine():
    lrs = _lrs(100, warmup=int(round(0.1 * 100)), min_lr=1e-5, lr=1e-3)
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 1e-5 and lrs[-1] < 2e-5


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 6) * 0.02)
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x + self.pos_embed)).mean(1))


def _run(model, tr, steps, gen):
    for _ in range(steps):
        x, y = torch.randn(8, 4, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        tr.update()


def _trainer(model):
    return Trainer(model, lr=1e-2, weight_decay=0.05, total_steps=20, warmup_steps=3, min_lr=1e-4, clip_grad=0.5,
                   no_decay=True)


def test_trainer_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tr = _trainer(model)
    _run(model, tr, 20, torch.Generator().manual_seed(1))
    assert tr.step == 20

    torch.manual_seed(5)
    first = _Tiny()
    first.load_state_dict(start)
    tr1 = _trainer(first)
    gen = torch.Generator().manual_seed(1)
    _run(first, tr1, 7, gen)
    tr1.save(tmp_path / "ck.pt", resume_tag={"run": 1}, state={"note": "x"})
    ck = load_checkpoint(tmp_path / "ck.pt")  # weights_only: the schedule's state must be plain data
    assert ck["step"] == 7 and ck["state"] == {"note": "x"}
    assert Trainer.matches(ck, {"run": 1}) and not Trainer.matches(ck, {"run": 2})
    assert not Trainer.matches(dict(ck, format="old"), {"run": 1})

    second = _Tiny()  # fresh process: other initial weights and lr, all replaced by the checkpoint
    tr2 = _trainer(second)
    tr2.load_state_dict(ck)
    assert tr2.step == 7 and tr2.lr == tr1.lr
    _run(second, tr2, 13, gen)
    for k, v in model.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    assert tr2.lr == tr.lr


def test_no_decay_groups_and_clipping(monkeypatch):
    model = _Tiny()
    tr = Trainer(model, lr=1e-3, weight_decay=0.05, total_steps=4, no_decay=True)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in tr.opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in by_decay[0.05]) == ["fc.weight", "head.weight"]
    assert sorted(names[i] for i in by_decay[0.0]) == ["fc.bias", "head.bias", "norm.bias", "norm.weight",
                                                       "pos_embed"]
    one = Trainer(model, lr=1e-3, weight_decay=0.05, total_steps=4)  # the anchor recipe: decay on everything
    assert len(one.opt.param_groups) == 1 and one.opt.param_groups[0]["weight_decay"] == 0.05
    norms = []
    monkeypatch.setattr(kt.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(max_norm))
    Trainer(model, lr=1e-3, weight_decay=0.0, total_steps=4, clip_grad=1.0).update()
    Trainer(model, lr=1e-3, weight_decay=0.0, total_steps=4).update()
    assert norms == [1.0]
