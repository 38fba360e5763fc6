"""Scale-out: every heavy stage under 2 gloo ranks equals the single-process run; a dead rank ends the job with a
clear error within the timeout; torchrun's elastic restart resumes finetuning from the last checkpoint.

Process startups dominate on a 2-core box, so ONE torchrun job runs probes -> scores -> finetune (killed once,
restarted) -> evaluation, and one plain two-process job checks the dead-peer error. The supernet's plain DDP
equality is tests/test_supernet.py::test_torchrun_ddp_matches_single_process (not repeated here).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _stitch_helpers import one_thread, tiny_family, write_selection  # noqa: F401  (autouse fixture)
from klas import distributed as kd
from klas.errors import KlasError
from klas.config import load_config
from klas.io import load_tensors
from klas.ops import PairwiseKL
from klas.stages.s1_probes import ProbesConfig
from klas.stages.s2_scores import ScoresConfig
from klas.stages.s4_finetune import FinetuneConfig
from klas.stages.s5_evaluation import EvaluationConfig
from klas.stitch import FitCfg
from _stitch_helpers import evaluate, finetune, probes, scores

TESTS = Path(__file__).parent
STITCHES_DDP = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-16", 0)]
PROBE_KW = dict(epochs=1, batch_size=32, train_subset=101, val_subset=50, stat_samples=64)  # ragged last batch
SCORE_KW = dict(batch_size=25, val_subset=70, dm_samples=30)  # the dm subsample crosses a batch edge
FT_KW = dict(recipe="shared", distill=None, max_stitches=None, epochs=1, steps_per_epoch=5, batch_size=32, train_subset=256, val_images=40, augment=False, lr=3e-3,
             ckpt_every=2)
EVAL_KW = dict(test_subset=101, latency=False)

STAGES_SCRIPT = """
import os, signal, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from _stitch_helpers import evaluate, finetune, probes, scores, tiny_family
from klas.stages.s1_probes import ProbesConfig
from klas.stages.s2_scores import ScoresConfig
from klas.stages.s4_finetune import FinetuneConfig
from klas.stages.s5_evaluation import EvaluationConfig
from klas.stitch import FitCfg
run, marker, mode, sel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
rank = int(os.environ["RANK"])

first = []

def die_once(step):  # rank 1 is killed (no cleanup, like a lost node) after step 3; checkpoints exist at step 2
    if not first:
        first.append(step)
        print(f"rank {{rank}} attempt {{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}}: first step {{step}}",
              flush=True)
    if rank == 1 and step == 3 and not marker.exists():
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
fam = tiny_family()
cfg = FinetuneConfig(**{ft}, accum_steps=2, init=FitCfg(samples=128, batch_size=64))
if mode == "stages":
    probes(fam, run, ProbesConfig(**{probe}), seed=0, progress=False)
    scores(fam, run, ScoresConfig(**{score}), progress=False)
    finetune(run, cfg, seed=0, selection_path=sel, family=fam, progress=False, on_step=die_once)
    evaluate(run, EvaluationConfig(**{ev}), progress=False)
else:  # mode "dead-peer": plain processes (no torchrun agent to clean up): rank 0 must notice on its own
    from klas.errors import KlasError
    try:
        finetune(run, cfg, seed=0, selection_path=sel, family=fam, progress=False, on_step=die_once)
    except KlasError as e:
        print(f"error: {{e}}", file=sys.stderr)
        sys.exit(2)
"""


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH",
                                                                                                       "")]), **extra)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "stages.py"
    path.write_text(STAGES_SCRIPT.format(ft=repr(FT_KW), probe=repr(PROBE_KW), score=repr(SCORE_KW),
                                         ev=repr(EVAL_KW)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(run: Path, stage: str, *files: str) -> dict[str, torch.Tensor]:
    return {f"{f}:{k}": t for f in files for k, t in load_tensors(run / stage / f).items()}


def _assert_same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{k}: {m}")


def test_stages_under_two_ranks_equal_single_process(tmp_path):
    """probes (DDP over probes, ragged last batch), scores (sharded val, all_reduced KL sums), finetuning (DDP with
    micro-batch accumulation, rank 1 SIGKILLed after step 3, torchrun --max-restarts 1 resumes from the step-2
    checkpoint) and evaluation (sharded test counts) all reproduce the single-process run."""
    ddp, marker = tmp_path / "ddp", tmp_path / "killed.marker"
    sel = write_selection(tmp_path / "sel.json", STITCHES_DDP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "1", "--monitor-interval", "0.2", str(_script(tmp_path)), str(ddp), str(marker), "stages", str(sel)]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the single-process reference runs meanwhile (the job's first minute is mostly process start-up)
    single = tmp_path / "single"
    torch.manual_seed(0)
    fam = tiny_family()
    probes(fam, single, ProbesConfig(**PROBE_KW), seed=0, progress=False)
    scores(fam, single, ScoresConfig(**SCORE_KW), progress=False)
    finetune(single, FinetuneConfig(**FT_KW, init=FitCfg(samples=128, batch_size=64)), seed=0,
             selection_path=sel, family=fam, progress=False)
    ev_single = evaluate(single, EvaluationConfig(**EVAL_KW), progress=False)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out[-3000:]
    assert marker.read_text() == "killed" and "KlasError: rank 0/2: distributed finetune gradient" in out, out[-3000:]
    for rank in range(2):  # first attempt from step 1; the restart resumed from the step-2 checkpoint
        assert f"rank {rank} attempt 0: first step 1" in out and f"rank {rank} attempt 1: first step 3" in out, out

    probe_weights = _tensors(single, "probes", "probes.safetensors")
    _assert_same(probe_weights, _tensors(ddp, "probes", "probes.safetensors"), rtol=1e-4, atol=1e-5)
    assert json.loads((ddp / "probes" / "probes.json").read_text())["world_size"] == 2
    _assert_same(_tensors(single, "scores", "scores.safetensors", "metrics.safetensors"),
                 _tensors(ddp, "scores", "scores.safetensors", "metrics.safetensors"), rtol=1e-5, atol=1e-7)
    rec = json.loads((ddp / "scores" / "scores.json").read_text())
    assert rec["n_val"] == 70 and rec["world_size"] == 2
    files = ("anchors.safetensors", "stitch_layers.safetensors")
    _assert_same(_tensors(single, "finetune", *files), _tensors(ddp, "finetune", *files), rtol=1e-4, atol=1e-5)
    meta = json.loads((ddp / "finetune" / "finetune.json").read_text())
    assert meta["world_size"] == 2 and len(meta["history"]) == 1
    ev = json.loads((ddp / "evaluation" / "evaluation.json").read_text())
    assert ev["world_size"] == 2 and ev["n_test"] == 101
    assert [r["test_acc"] for r in ev["configs"]] == [r["test_acc"] for r in ev_single.configs]  # exact counts


def test_dead_peer_stops_the_job_with_a_clear_error(tmp_path):
    """Two plain processes (no launcher to clean up): rank 1 dies mid-finetuning; rank 0 fails its next collective
    and exits with the one-line error well within the collective timeout instead of hanging."""
    sel = write_selection(tmp_path / "sel.json", STITCHES_DDP)
    port, timeout = _free_port(), 20
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KLAS_DIST_TIMEOUT_S=str(timeout))
        procs.append(subprocess.Popen([sys.executable, str(_script(tmp_path)), str(tmp_path / "run"),
                                       str(tmp_path / "marker"), "dead-peer", str(sel)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _, err1 = procs[1].communicate(timeout=240)
    t_dead = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung after its peer died")
    assert procs[1].returncode == -9, err1[-2000:]
    assert procs[0].returncode == 2, err0[-2000:]
    line = err0.strip().splitlines()[-1]
    assert line.startswith("error: rank 0/2: distributed") and "peer rank died" in line and "resume" in line, err0
    assert time.monotonic() - t_dead < timeout + 15
    # the checkpoint rank 0 wrote before the failure is there to resume from
    assert (tmp_path / "run" / "finetune" / "supernet.ckpt").is_file()


def test_single_process_helpers_and_errors(rng, monkeypatch):
    """Outside torchrun every helper is an identity; bad settings are one-line KlasErrors."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    di = kd.init()
    assert (di.rank, di.world, di.is_main, di.distributed) == (0, 1, True, False)
    acc = PairwiseKL(3, 4)
    a, b = torch.randn(3, 17, 5, generator=rng) * 30, torch.randn(4, 17, 5, generator=rng)
    acc.update(a, b)
    before = acc.sum.clone()
    kd.all_reduce_pairwise_kl([acc])
    assert torch.equal(acc.sum, before) and acc.count == 17
    assert kd.gather_objects({"x": 1}) == [{"x": 1}] and kd.broadcast_object(5) == 5 and kd.all_reduce_int(7) == 7
    kd.check_divisible(33, 1)
    with pytest.raises(KlasError, match="--batch-size 33: .* 2 ranks"):
        kd.check_divisible(33, 2)
    monkeypatch.setenv(kd.TIMEOUT_ENV, "soon")
    with pytest.raises(KlasError, match="KLAS_DIST_TIMEOUT_S='soon'"):
        kd.timeout_s()
    monkeypatch.setenv(kd.TIMEOUT_ENV, "45")
    assert kd.timeout_s() == 45.0
    with pytest.raises(KlasError, match=r"\[finetune\] accum_steps = 0: expected >= 1"):
        load_config(raw={"finetune": {"accum_steps": 0}})
    with pytest.raises(KlasError, match=r"--parallel 'zero': expected one of ddp, fsdp"):
        load_config(flags={("finetune", ("parallel",)): ("zero", "--parallel")})


def test_accumulation_equals_one_pass(tmp_path):
    """Micro-batching a step (accum_steps=3: unequal micro-batches of a 32-batch) gives the one-pass weights."""
    sel = write_selection(tmp_path / "sel.json", STITCHES_DDP)
    kw = dict(FT_KW, steps_per_epoch=3, val_images=0, init=FitCfg(samples=64, batch_size=64))
    runs = {}
    for accum in (1, 3):
        torch.manual_seed(0)
        finetune(tmp_path / f"a{accum}", FinetuneConfig(**kw, accum_steps=accum), seed=0,
                 selection_path=sel, family=tiny_family(), progress=False)
        runs[accum] = _tensors(tmp_path / f"a{accum}", "finetune", "anchors.safetensors",
                               "stitch_layers.safetensors")
    _assert_same(runs[1], runs[3], rtol=1e-4, atol=1e-5)
