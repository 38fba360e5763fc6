"""``[finetune] parallel = "fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per block, then the
root) on 2 gloo ranks on the CPU ends with the single-process run's weights and loss curve:

* the finetune stage on the tiny ViT family, independent recipe (micro-batch accumulation through ``no_sync``,
  checkpoints gathered to full tensors, a crash resumed from the sharded run's checkpoint) and frozen (LoRA), val
  accuracy included;
* two tiny random Llama anchors stitched (``klas.lm.view.CausalLMView``: the HF decoder layers are the units), trained
  by ``klas.train``'s Trainer under ``data_parallel(..., "fsdp")`` (the LM data path is not needed for this);
* the shared recipe is refused in one line.

ONE torchrun job runs every two-rank case (process start-up dominates on a 2-core box); the single-process
references run in this process meanwhile.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from _stitch_helpers import finetune, one_thread, tiny_family, write_selection  # noqa: F401  (autouse fixture)
from klas.errors import KlasError
from klas.io import load_tensors, tensor_metadata
from klas.stages.s4_finetune import FinetuneConfig
from klas.stitch import FitCfg

TESTS = Path(__file__).parent
STITCHES = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-16", 0)]
BASE = dict(epochs=1, steps_per_epoch=4, batch_size=32, train_subset=256, augment=False, lr=3e-3, val_images=40,
            parallel="fsdp")
CASES = {  # name: FinetuneConfig settings (augmentation off: it is drawn per shard)
    "independent": dict(BASE, recipe="independent", accum_steps=2, ckpt_every=2),
    "frozen": dict(BASE, recipe="frozen", distill=None),
}
CRASH_AT = 3  # the resumed case: a crash on every rank after step 3 of the first stitch (checkpoint at step 2)

SCRIPT = """
import json, os, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from _stitch_helpers import finetune, tiny_family
from klas.stages import s4_finetune as s4
from klas.stages.s4_finetune import FinetuneConfig
from klas.stitch import FitCfg
from klas.train import is_sharded
out, sel = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
runs = []
loop = s4.run_epochs

def held(model):  # how a rank holds the parameters: FSDP2-sharded, and how many elements are local
    p = list(model.parameters())
    return dict(sharded=is_sharded(model), numel=sum(q.numel() for q in p),
                local=sum(q.to_local().numel() if hasattr(q, "to_local") else q.numel() for q in p))

def spy(tr, state, **kw):  # every stitch's loop: this rank's step losses
    runs.append(held(tr.model))
    loop(tr, state, **kw)
    runs[-1]["losses"] = list(state.losses)

s4.run_epochs = spy

class Crash(RuntimeError):
    pass

def crash(step):
    if step == {crash}:
        raise Crash

torch.manual_seed(0)
fam = tiny_family()
for name, kw in {cases}.items():
    cfg = FinetuneConfig(**kw, init=FitCfg(samples=128, batch_size=64))
    runs.clear()
    finetune(out / name, cfg, seed=0, selection_path=sel, family=fam, progress=False)
    (out / f"{{name}}.rank{{rank}}.json").write_text(json.dumps(runs))
    if name == "independent":  # crash (every rank), then resume from the checkpoint the sharded run gathered
        try:
            finetune(out / "resumed", cfg, seed=0, selection_path=sel, family=fam, progress=False, on_step=crash)
            raise SystemExit("no crash")
        except Crash:
            pass
        assert list((out / "resumed" / "finetune" / "checkpoints").glob("*.ckpt"))
        finetune(out / "resumed", cfg, seed=0, selection_path=sel, family=fam, progress=False)
# the Llama case
from klas.train import data_parallel, unshard
from test_fsdp2 import lm_stitch, lm_train
net = lm_stitch()
model = data_parallel(net, "fsdp", torch.device("cpu"))
info = dict(held(model), losses=lm_train(net, model, rank, 2))
plain = unshard(model, lm_stitch())
if rank == 0:
    torch.save(plain.state_dict(), out / "llama.pt")
(out / f"llama.rank{{rank}}.json").write_text(json.dumps([info]))
print(f"rank {{rank}} done", flush=True)
"""

# --- two tiny random Llama anchors (different width, head dim, KV heads, depth), stitched, a causal-LM loss -------
VOCAB, T = 61, 9
LM_A = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4,
            head_dim=8, num_key_value_heads=2, max_position_embeddings=32)
LM_B = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=70, num_hidden_layers=4, num_attention_heads=3,
            head_dim=16, num_key_value_heads=1, max_position_embeddings=32)
LM_STEPS, LM_BATCH, LM_ACCUM = 4, 8, 2


def lm_stitch():
    """lm-a's embedding and layers 0..1, a stitch layer, lm-b's layers 2.. and head (independent recipe's copies)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from klas.lm.view import CausalLMView
    from klas.stitch import StitchConfig, StitchLayer
    from klas.stitched import trainable_stitch

    views = []
    for name, args, seed in (("lm-a", LM_A, 1), ("lm-b", LM_B, 2)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**args, attn_implementation="sdpa")).eval()
        views.append(CausalLMView(model, name, (T,)))
    a, b = views
    torch.manual_seed(3)
    return trainable_stitch(a, b, StitchConfig("lm-a", 1, "lm-b", 1), StitchLayer(a.feature_dim(1), b.feature_dim(1)),
                            "independent")


def lm_train(net, model, rank: int, world: int) -> list[float]:
    """LM_STEPS finetune steps as the stage takes them (Trainer: AdamW without decay on norms, warm-up + cosine,
    clipping; this rank's interleaved shard of each global batch in LM_ACCUM micro-batches, synchronised on the last);
    returns this rank's shard losses."""
    from klas.train import Trainer

    ids = torch.randint(0, VOCAB, (LM_STEPS, LM_BATCH, T), generator=torch.Generator().manual_seed(4))
    tr = Trainer(net, lr=3e-3, weight_decay=0.05, total_steps=LM_STEPS, warmup_steps=1, clip_grad=1.0, no_decay=True)
    net.train()
    losses = []
    for step in range(LM_STEPS):
        x = ids[step][rank::world]
        total = torch.zeros(())
        for m, xm in enumerate(x.tensor_split(LM_ACCUM)):
            with model.no_sync() if m < LM_ACCUM - 1 and hasattr(model, "no_sync") else nullcontext():
                logits = model(xm)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), xm[:, 1:].reshape(-1))
                loss = loss * (len(xm) / len(x))
                loss.backward()
            total += loss.detach()
        tr.update()
        losses.append(total.item())
    return losses


# --- the one two-rank job and the single-process references ----------------------------------------------------

def _configs(run: Path) -> dict[str, tuple[dict, dict]]:
    """Per trained configuration file: (its tensors, its record: losses, val accuracy, ...)."""
    out = {}
    for f in sorted((run / "finetune" / "configs").glob("*.safetensors")):
        out[f.name] = load_tensors(f), json.loads(tensor_metadata(f)["state"])
    return out


def _assert_same(a: dict, b: dict) -> None:
    """Float32 equality as the DDP tests have it: splitting the batch over ranks reorders float sums, which AdamW's
    normalised steps carry into the weights (DDP's run differs from one process by the very same amounts here)."""
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (single-process result, two-rank result)}; a result is [(weights, losses, val_acc) per stitch] and the
    two-rank one also [per rank: how each stitch's loop held the parameters and its shard losses]."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    sel = write_selection(tmp / "sel.json", STITCHES)
    script = tmp / "fsdp2.py"
    script.write_text(SCRIPT.format(cases=repr(CASES), crash=CRASH_AT))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(script), str(tmp / "fsdp"), str(sel)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        fam = tiny_family()
        single = {}
        for name, kw in CASES.items():  # the single-process references, meanwhile (no wrapper in one process)
            finetune(tmp / "single" / name, FinetuneConfig(**kw, init=FitCfg(samples=128, batch_size=64)), seed=0,
                     selection_path=sel, family=fam, progress=False)
            single[name] = [(w, r["losses"], r["val_acc"]) for w, r in _configs(tmp / "single" / name).values()]
        net = lm_stitch()
        losses = lm_train(net, net, 0, 1)
        single["llama"] = [({k: v.detach().clone() for k, v in net.state_dict().items()}, losses, None)]
        torch.set_num_threads(before)
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    result = {}
    for name in single:
        ranks = [json.loads((tmp / "fsdp" / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        if name == "llama":
            fsdp = [(torch.load(tmp / "fsdp" / "llama.pt"), ranks[0][0]["losses"], None)]
        else:
            assert json.loads((tmp / "fsdp" / name / "finetune" / "finetune.json").read_text())["world_size"] == 2
            fsdp = [(w, r["losses"], r["val_acc"]) for w, r in _configs(tmp / "fsdp" / name).values()]
        result[name] = single[name], fsdp, ranks
    resumed = [w for w, _ in _configs(tmp / "fsdp" / "resumed").values()]
    return result, resumed


@pytest.mark.parametrize("case", [*CASES, "llama"])
def test_fsdp2_two_gloo_ranks_equal_single_process(runs, case):
    single, fsdp, ranks = runs[0][case]
    assert len(single) == len(fsdp) == len(ranks[0]) == len(ranks[1]) and single
    for pos, ((wa, la, acc_a), (wb, lb, acc_b)) in enumerate(zip(single, fsdp)):
        for r in range(2):  # really sharded: each rank held about half of the parameters
            held = ranks[r][pos]
            assert held["sharded"] and held["local"] < 0.6 * held["numel"], held
        _assert_same(wa, wb)
        # each rank's loss is the mean over its half of the global batch: their mean is the global batch's loss
        assert lb == ranks[0][pos]["losses"]  # the record is rank 0's
        mean = [(a + b) / 2 for a, b in zip(ranks[0][pos]["losses"], ranks[1][pos]["losses"])]
        assert len(mean) == len(la) == 4
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(la), rtol=0, atol=1e-5)
        assert acc_a == acc_b  # val accuracy: scored on the gathered (unsharded) network


def test_fsdp2_resume_from_sharded_checkpoint(runs):
    """A crash after step 3 resumes from the step-2 checkpoint the two ranks gathered (full tensors) and ends with
    the uninterrupted single-process weights."""
    single = [w for w, _, _ in runs[0]["independent"][0]]
    resumed = runs[1]
    assert len(resumed) == len(single) == len(STITCHES)
    for a, b in zip(single, resumed):
        _assert_same(a, b)


def test_fsdp_refuses_shared_recipe(tmp_path):
    sel = write_selection(tmp_path / "sel.json", STITCHES[:1])
    cfg = FinetuneConfig(**dict(BASE, recipe="shared", distill=None), init=FitCfg(samples=64, batch_size=64))
    with pytest.raises(KlasError, match=r"finetune\.parallel = fsdp: not with finetune\.recipe = shared") as e:
        finetune(tmp_path / "r", cfg, seed=0, selection_path=sel, family=tiny_family(), progress=False)
    assert "\n" not in str(e.value)


def test_fsdp_units_blocks_then_root_one_dtype_each():
    """The units fully_shard is applied to: every block of both anchor copies, then the root; a stitch layer of
    another dtype than the anchors becomes its own unit (FSDP2 reduces a unit's gradients in one dtype)."""
    from klas.stitch import StitchConfig, StitchLayer
    from klas.stitched import trainable_stitch
    from klas.train import _fsdp_units

    fam = tiny_family()
    src, tgt = fam["tv-8"], fam["tv-16"]
    net = trainable_stitch(src, tgt, StitchConfig("tv-8", 2, "tv-16", 0),
                           StitchLayer(src.feature_dim(2), tgt.feature_dim(0)), "independent")
    units = _fsdp_units(net)
    assert [id(u) for u in units] == [id(b) for b in net.src.blocks + net.tgt.blocks] + [id(net)]
    net.layer.double()
    units = _fsdp_units(net)
    assert [id(u) for u in units] == [id(b) for b in net.src.blocks + net.tgt.blocks] + [id(net.layer), id(net)]


def test_fsdp_units_of_llama_are_the_decoder_layers():
    """The LM view's blocks wrap HF decoder layers outside the module tree: the layers themselves are the units."""
    from klas.train import _fsdp_units

    net = lm_stitch()
    layers = [*net.src.model.model.layers, *net.tgt.model.model.layers]
    assert [id(u) for u in _fsdp_units(net)] == [id(m) for m in layers] + [id(net)]
