"""The battery: bad inputs and faults against every ``klas`` command, table-driven.

Every case runs the real CLI (``klas.cli.main``) in its own process and asserts: a non-zero exit, exactly one line
on stderr (progress bars aside) naming the culprit (key, flag or file), no "Traceback" in stdout or stderr, and no
file lost or half-written (the hashes of every file the case guards are the same afterwards). One small real run
(a two-anchor ViT family defined in the config, tiny settings) is built once per module by ``klas run`` in a
subprocess and copied for destructive cases. To keep ~70 CLI calls within a couple of minutes on a 2-core box the
simple cases are forked from a warm server process that imported klas once (each case is still a separate
process with its own stdout/stderr, cwd and exit status); the run, the concurrent runs and the final resume are
plain ``python -m klas`` subprocesses.

Faults during export: one export is run with hooks that copy the run directory at each moment a kill could strike
(first model file staged, all staged before the manifest, manifest staged before the swap) -- the state a SIGKILL
leaves on disk -- and then SIGKILL the process for real right after the swap, before the stage record is written.
Every such state must hold a zoo that ``klas verify`` accepts (the old one or the new one) and none may be reported
as up to date by ``klas run --dry-run`` unless its record and artifact agree.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _stitch_helpers import tiny_vit_config

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# A warm process that imported klas (and torch's ONNX exporter) once and forks one child per request; the child
# chdirs, points fds 1 and 2 at files, applies an optional fault and runs ``klas.cli.main(argv)``.
SERVER = r'''
import errno, json, os, shutil, signal, sys
sys.argv = ["klas"]
import klas.cli, klas.io, klas.export.member as member, klas.export.manifest as zoo_manifest
import klas.stages.s6_export as s6
import klas.config, klas.pipeline, klas.data, klas_runtime.runtime, klas_runtime.profile, onnxruntime, PIL.Image
klas.cli.build_parser()  # every command module imported once, here
from klas_runtime.io import atomic_path
reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
print("ready", file=reply)

def faults(f):
    if "snapshots" in f:  # copy the run dir at each moment a kill could strike, then SIGKILL after the swap
        run, dest, seen = f["run"], f["snapshots"], {"n": 0}
        os.makedirs(dest + "-claimed", exist_ok=True)
        write, save, swap = member.write_atomic, zoo_manifest.save_manifest, s6.swap_dirs
        def snap(name):  # once per moment: the export's forked workers each stage a first model
            try:
                os.mkdir(os.path.join(dest + "-claimed", name))
            except FileExistsError:
                return
            shutil.copytree(run, os.path.join(dest, name), symlinks=True)
        def w(path, data):
            write(path, data)
            seen["n"] += 1
            if seen["n"] == 1:
                snap("first-model-staged")
        def sm(*a, **k):
            snap("models-staged-no-manifest")
            return save(*a, **k)
        def sw(new, old):
            snap("manifest-staged-before-swap")
            swap(new, old)
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: after the swap, before the stage record
        member.write_atomic, zoo_manifest.save_manifest, s6.swap_dirs = w, sm, sw
    if "enospc" in f:  # the disk fills up while the n-th zoo file is written
        write, seen = member.write_atomic, {"n": 0}
        def full(path, data):
            seen["n"] += 1
            if seen["n"] >= f["enospc"]:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write(path, data)
        member.write_atomic = full
    if "enospc_save" in f:  # the disk fills up during the n-th checkpoint write (torch.save): half of it lands
        import torch
        save, seen = torch.save, {"n": 0}
        def full_save(obj, fobj, *a, **k):
            seen["n"] += 1
            if seen["n"] >= f["enospc_save"]:
                fobj.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return save(obj, fobj, *a, **k)
        torch.save = full_save
    if "eacces" in f:  # the file system refuses to create folders under a prefix
        mkdir, prefix = os.mkdir, f["eacces"]
        def no(path, *a, **k):
            if os.fspath(path).startswith(prefix):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return mkdir(path, *a, **k)
        os.mkdir = no

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.argv = ["klas"] + req["argv"]
            signal.alarm(req.get("alarm", 300))  # a case that hangs (a FIFO read as an image) fails, not the suite
            faults(req["fault"])
            try:
                rc = klas.cli.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=reply)
'''


class Server:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV, cwd=ROOT)
        self.lock = threading.Lock()
        self.n = 0
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv, cwd=None, fault=None, env=None):
        with self.lock:
            self.n += 1
            out, err = self.tmp / f"out{self.n}.txt", self.tmp / f"err{self.n}.txt"
            req = dict(argv=[str(a) for a in argv], cwd=str(cwd or self.tmp), fault=fault or {}, env=env or {},
                       out=str(out), err=str(err))
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def klas_proc(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "klas", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          cwd=kw.pop("cwd", ROOT), **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One small real run (probes ... zoo) of a two-anchor family defined in the config, and the fork server."""
    d = tmp_path_factory.mktemp("battery")
    cfg = tiny_vit_config(d)
    r = klas_proc("run", cfg, "--run-dir", d / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    server = Server(tmp_path_factory.mktemp("server"))
    yield dict(dir=d, cfg=cfg, run=d / "run", zoo=d / "run" / "zoo", server=server)
    server.close()


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (the run's lock file aside: a refused command may take
    and release it)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns) and blank lines."""
    lines = []
    for ln in stderr.splitlines():
        ln = ln.split("\r")[-1].strip()
        if ln and not ("it/s]" in ln or "s/it]" in ln or "model/s]" in ln):
            lines.append(ln)
    return lines


# --- setups: each gets (base, tmp) and returns the placeholders its argv uses; they build only in tmp ------------------

def _zoo(b, t):
    shutil.copytree(b["zoo"], t / "zoo", symlinks=True)
    return t / "zoo"


def _manifest(zoo):
    return json.loads((zoo / "manifest.json").read_text())


def _first_model(zoo):
    return next(m for m in _manifest(zoo)["models"] if "file" in m)


def setup_tampered(b, t):
    zoo = _zoo(b, t)
    f = zoo / _first_model(zoo)["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return dict(zoo=zoo, culprit=f.name)


def setup_missing(b, t):
    zoo = _zoo(b, t)
    f = zoo / _first_model(zoo)["file"]
    f.unlink()
    return dict(zoo=zoo, culprit=f.name)


def setup_symlinked_manifest(b, t):
    zoo = _zoo(b, t)
    outside = t / "elsewhere.json"
    shutil.move(zoo / "manifest.json", outside)
    (zoo / "manifest.json").symlink_to(outside)
    return dict(zoo=zoo, culprit="manifest.json")


def _rewrite(zoo, entry_name, data: bytes, **fields):
    """Replace a model file with ``data`` and re-hash it in the manifest (what a forger would do)."""
    m = _manifest(zoo)
    for e in m["models"]:
        if e["name"] == entry_name:
            (zoo / e["file"]).write_bytes(data)
            e.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), **fields)
    (zoo / "manifest.json").write_text(json.dumps(m, indent=2))


def setup_not_onnx(b, t):
    zoo = _zoo(b, t)
    e = _first_model(zoo)
    _rewrite(zoo, e["name"], b"these bytes are not an ONNX model, but the manifest has their hash\n" * 50)
    return dict(zoo=zoo, culprit=e["file"])


def setup_external_data(b, t):
    """A real model whose weights were moved to weights.bin by onnx.external_data_helper; the manifest re-hashed;
    the command runs from a cwd holding that weights.bin (where onnxruntime would otherwise look)."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    zoo = _zoo(b, t)
    e = _first_model(zoo)
    model = onnx.load(str(zoo / e["file"]))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=256)
    cwd = t / "cwd"
    cwd.mkdir()
    onnx.save(model, str(cwd / "moved.onnx"))
    _rewrite(zoo, e["name"], (cwd / "moved.onnx").read_bytes())
    shutil.copy(cwd / "weights.bin", zoo / "weights.bin")
    return dict(zoo=zoo, cwd=cwd, culprit=e["file"])


def setup_traversal(b, t):
    zoo = _zoo(b, t)
    m = _manifest(zoo)
    m["models"][0]["file"] = "../../etc/passwd.onnx"
    (zoo / "manifest.json").write_text(json.dumps(m, indent=2))
    return dict(zoo=zoo, culprit="../../etc/passwd.onnx")


def setup_zoo_is_file(b, t):
    (t / "zoo").write_text("not a folder")
    return dict(zoo=t / "zoo", culprit="zoo")


def setup_not_image(b, t):
    zoo = _zoo(b, t)
    (t / "cat.png").write_text("not an image at all")
    return dict(zoo=zoo, img=t / "cat.png", culprit="cat.png")


def setup_bomb(b, t):
    """A PNG of a few hundred bytes whose header declares 100000 x 100000 pixels (10 gigapixels)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    (t / "bomb.png").write_bytes(png)
    zoo = _zoo(b, t)
    return dict(zoo=zoo, img=t / "bomb.png", culprit="bomb.png")


def setup_config(text, culprit="bad.toml"):
    def make(b, t):
        (t / "bad.toml").write_text(text)
        return dict(cfg=t / "bad.toml", culprit=culprit)
    return make


def setup_config_dir(b, t):
    (t / "conf.toml").mkdir()
    return dict(cfg=t / "conf.toml", culprit="conf.toml")


def setup_config_binary(b, t):
    (t / "bin.toml").write_bytes(b"\xff\xfe\x00\x81 not text")
    return dict(cfg=t / "bin.toml", culprit="bin.toml")


def setup_none(b, t):
    return {}


def setup_zoo_only(b, t):
    return dict(zoo=_zoo(b, t))


def setup_image(b, t):
    from PIL import Image

    Image.new("L", (28, 28), 128).save(t / "x.png")
    return dict(zoo=_zoo(b, t), img=t / "x.png")


def setup_file(b, t):
    (t / "afile").write_text("x")
    return dict(file=t / "afile", culprit="afile")


def setup_run(b, t):
    shutil.copytree(b["run"], t / "run", symlinks=True)
    return dict(run=t / "run", culprit="")


def _fmnist_root(t, images, labels):
    """A Fashion-MNIST root of IDX files from uint8 arrays (train and test alike)."""
    import numpy as np

    root = t / "fmnist"
    root.mkdir()

    def idx(arr, code=0x08):
        return bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + \
            np.ascontiguousarray(arr).tobytes()
    for img, lbl in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                     ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        (root / img).write_bytes(idx(images))
        (root / lbl).write_bytes(idx(labels))
    return root


def setup_bad_labels(b, t):
    import numpy as np

    labels = np.arange(6000, dtype=np.uint8) % 10
    labels[4321] = 17
    root = _fmnist_root(t, np.zeros((6000, 28, 28), np.uint8), labels)
    return dict(root=root, culprit="label 17")


def setup_bad_size(b, t):
    import numpy as np

    root = _fmnist_root(t, np.zeros((6000, 32, 32), np.uint8), np.arange(6000, dtype=np.uint8) % 10)
    return dict(root=root, culprit="32x32")


def setup_evil_cifar(b, t):
    """A CIFAR-100 root whose train file is a pickle that calls os.system when loaded with plain pickle."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {t / 'PWNED'}",))

    root = t / "cifar"
    root.mkdir()
    for name in ("train", "test", "meta"):
        (root / name).write_bytes(pickle.dumps({"data": Evil(), "fine_labels": [0]}, protocol=2))
    cfg = t / "cifar.toml"  # the family's dataset is CIFAR-100 (the anchors are never reached)
    cfg.write_text(b["cfg"].read_text().replace('dataset = "fashion-mnist"', 'dataset = "cifar100"')
                   .replace('weights = "', f'weights = "{b["dir"]}/'))
    return dict(root=root, cfg=cfg, culprit="cifar/train", pwned=t / "PWNED")


# --- issue 32's setups -----------------------------------------------------------------------------------------------

def setup_swapped(b, t):
    """One model file replaced by another valid model of the zoo, its hash recomputed in the manifest."""
    zoo = _zoo(b, t)
    a, other = [e for e in _manifest(zoo)["models"] if "file" in e][:2]
    _rewrite(zoo, a["name"], (zoo / other["file"]).read_bytes())
    return dict(zoo=zoo, culprit=a["file"])


def setup_fifo(b, t):
    zoo = _zoo(b, t)
    os.mkfifo(t / "x.png")
    return dict(zoo=zoo, img=t / "x.png", culprit="x.png")


def setup_no_manifest(b, t):
    run = t / "run"
    shutil.copytree(b["run"], run, symlinks=True)
    (run / "zoo" / "manifest.json").unlink()
    return dict(zoo=run / "zoo", run=run, culprit="manifest.json")


def setup_short_classes(b, t):
    zoo = _zoo(b, t)
    m = _manifest(zoo)
    m["models"][0]["output"]["classes"] = m["models"][0]["output"]["classes"][:-1]
    (zoo / "manifest.json").write_text(json.dumps(m, indent=2))
    return dict(zoo=zoo, culprit="models[0].output")


def setup_idx_float(b, t):
    """A Fashion-MNIST root whose image files declare float32 data (code 0x0D), as other tools write them."""
    import numpy as np

    root = _fmnist_root(t, np.zeros((6000, 28, 28), np.uint8), np.arange(6000, dtype=np.uint8) % 10)
    imgs = np.random.default_rng(0).random((6000, 28, 28), dtype=np.float32).astype(">f4")
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (root / name).write_bytes(bytes([0, 0, 0x0D, 3]) + b"".join(int(n).to_bytes(4, "big") for n in imgs.shape)
                                  + imgs.tobytes())
    return dict(root=root, culprit="float32")


def setup_run_json_list(b, t):
    (t / "run").mkdir()
    (t / "run" / "run.json").write_text("[1, 2]")
    return dict(run=t / "run", culprit="run.json")


def setup_hub_config(b, t):
    """The family's first anchor names hub weights that do not exist (this box has no network at all)."""
    text = b["cfg"].read_text().replace('weights = "tv-8.safetensors"', 'weights = "hf-hub:klas-test/no-such-model"')
    (t / "hub.toml").write_text(text.replace('weights = "tv-16', f'weights = "{b["dir"]}/tv-16'))
    return dict(cfg=t / "hub.toml", culprit="tv-8")

# Each case: id, setup, argv (placeholders from the setup and {tmp}), needle the one stderr line must contain, the
# paths whose files must be unchanged ("guard", placeholders), and an optional fault for the forked process.
CFG_RUN = ["run", "{cfg}", "--run-dir", "{tmp}/newrun"]
CASES = [
    # --- settings, checked at load (every example of the issue), before any stage or folder is made -------------
    ("config-selection-method", setup_config("[selection]\nmethod = 'nope'\n"), CFG_RUN,
     "[selection] method = 'nope'", ["{cfg}"]),
    ("config-scores-impl", setup_config("[scores]\nimpl = 'bogus'\n"), CFG_RUN, "[scores] impl = 'bogus'", []),
    ("config-finetune-lr", setup_config("[finetune]\nlr = -1.0\n"), CFG_RUN, "[finetune] lr = -1.0", []),
    ("config-latency-repeats", setup_config("[evaluation]\nlatency_repeats = 0\n"), CFG_RUN,
     "[evaluation] latency_repeats = 0", []),
    ("config-export-opset", setup_config("[export]\nopset = 3\n"), CFG_RUN, "[export] opset = 3", []),
    ("config-temperature", setup_config("[scores]\ntemperature = 0\n"), CFG_RUN, "[scores] temperature = 0", []),
    ("config-test-subset", setup_config("[evaluation]\ntest_subset = -1\n"), CFG_RUN,
     "[evaluation] test_subset = -1", []),
    ("config-threads-dry-run", setup_config("[run]\nthreads = -2\n"), CFG_RUN + ["--dry-run"],
     "[run] threads = -2", []),
    ("config-unknown-key", setup_config("[probes]\nepoch = 3\n"), CFG_RUN, "unknown key [probes] epoch", []),
    ("config-invalid-toml", setup_config("[probes\nepochs = 1\n"), CFG_RUN, "invalid TOML", []),
    ("config-bad-set", setup_config("[selection]\ntau = 0.1\n", "--set"), CFG_RUN + ["--set", "selection.tau=-1"],
     "--set selection.tau = -1", []),
    ("config-malformed-set", setup_config("", "--set"), CFG_RUN + ["--set", "tau"], "--set 'tau'", []),
    ("config-path-is-dir", setup_config_dir, ["config", "{cfg}"], "conf.toml", []),
    ("config-not-text", setup_config_binary, ["config", "{cfg}"], "bin.toml", ["{cfg}"]),
    ("config-missing", setup_config("", "nope.toml"), ["config", "{tmp}/nope.toml"], "nope.toml", []),
    ("config-dry-run-writes-nothing", setup_config("[export]\nopset = 3\n"), CFG_RUN + ["--dry-run"],
     "[export] opset = 3", []),
    # --- single-stage commands: bad flags and --set blamed on themselves -----------------------------------------
    ("probe-bad-set", setup_run, ["probe", "--run-dir", "{run}", "--set", "probes.epochs=0"],
     "--set probes.epochs = 0", ["{run}"]),
    ("score-bad-impl", setup_run, ["score", "--run-dir", "{run}", "--set", "scores.impl=bogus"],
     "scores.impl = 'bogus'", ["{run}"]),
    ("select-bad-method", setup_run, ["select", "--run-dir", "{run}", "--method", "nope"], "--method 'nope'",
     ["{run}"]),
    ("finetune-bad-lr", setup_run, ["finetune", "--run-dir", "{run}", "--set", "finetune.lr=-1.0"],
     "finetune.lr = -1.0", ["{run}"]),
    ("evaluate-unknown-flag", setup_run, ["evaluate", "--run-dir", "{run}", "--no-such-flag"], "--no-such-flag",
     ["{run}"]),
    ("export-bad-opset", setup_run, ["export", "--run-dir", "{run}", "--set", "export.opset=3"],
     "export.opset = 3", ["{run}"]),
    ("anchors-unknown-family", setup_none, ["anchors", "eval", "no-such-family"], "no-such-family", []),
    # --- run directories ------------------------------------------------------------------------------------------
    ("run-dir-is-file", setup_file, ["run", "--run-dir", "{file}", "--until", "probes"], "afile", ["{file}"]),
    ("evaluate-run-dir-under-file", setup_file, ["evaluate", "--run-dir", "{file}/run"], "lies under",
     ["{file}"]),
    ("probe-permission-denied", setup_none, ["probe", "--run-dir", "{tmp}/locked/run"], "locked",
     [], {"eacces": "{tmp}/locked"}),
    ("compare-method-without-run-dir", setup_none, ["compare", "--out", "{tmp}/out", "--selection", "klas", "mse"],
     "--selection 'klas'", []),
    ("report-out-under-file", setup_run, ["report", "{run}", "--out", "{run}/config.toml/report.html"],
     "config.toml", ["{run}"]),
    ("report-not-a-run", setup_none, ["report", "{tmp}/no-run"], "no-run", []),
    ("study-not-a-run", setup_none, ["study", "sensitivity", "--run-dir", "{tmp}/no-run", "--out", "{tmp}/o"],
     "no-run", []),
    # --- data: contents checked when a stage first loads them, untrusted files never executed ------------------
    ("data-label-out-of-range", setup_bad_labels, ["run", "{base_cfg}", "--run-dir", "{tmp}/r",
                                                   "--set", "data.root=\"{root}\"", "--until", "probes"],
     "label 17", ["{root}"]),
    ("data-image-size", setup_bad_size, ["run", "{base_cfg}", "--run-dir", "{tmp}/r",
                                         "--set", "data.root=\"{root}\"", "--until", "probes"], "32x32",
     ["{root}"]),
    # NOTE: through `klas anchors adapt`, the one command that reads a dataset whose class count (CIFAR-100's 100)
    # differs from the family's: `klas run` rightly stops earlier on that mismatch, before reading any pickle
    ("data-evil-pickle", setup_evil_cifar, ["anchors", "adapt", "{cfg}", "--out", "{tmp}/adapted", "--set",
                                            "data.root=\"{root}\""], "system",
     ["{root}"]),
    # --- zoos: verify / pick / predict / profile refuse what the manifest does not vouch for --------------------
    ("verify-tampered", setup_tampered, ["verify", "{zoo}"], "sha256", ["{zoo}"]),
    ("pick-tampered", setup_tampered, ["pick", "{zoo}"], "sha256", ["{zoo}"]),
    ("verify-missing-file", setup_missing, ["verify", "{zoo}"], "missing", ["{zoo}"]),
    ("predict-missing-file", setup_missing, ["predict", "{zoo}", "{tmp}/x.png"], "missing", ["{zoo}"]),
    ("verify-symlinked-manifest", setup_symlinked_manifest, ["verify", "{zoo}"], "not a regular file", ["{zoo}"]),
    ("profile-symlinked-manifest", setup_symlinked_manifest, ["profile", "{zoo}", "--runs", "1"],
     "not a regular file", ["{zoo}"]),
    ("verify-external-data", setup_external_data, ["verify", "{zoo}"], "external data", ["{zoo}", "{cwd}"]),
    ("predict-external-data", setup_external_data, ["pick", "{zoo}", "--max-flops", "1G"], "external data",
     ["{zoo}", "{cwd}"]),
    ("verify-not-onnx", setup_not_onnx, ["verify", "{zoo}"], "not an ONNX model", ["{zoo}"]),
    ("pick-not-onnx", setup_not_onnx, ["pick", "{zoo}"], "not an ONNX model", ["{zoo}"]),
    ("verify-traversal", setup_traversal, ["verify", "{zoo}"], "passwd", ["{zoo}"]),
    ("pick-zoo-is-file", setup_zoo_is_file, ["pick", "{zoo}"], "zoo", ["{zoo}"]),
    # --- images -----------------------------------------------------------------------------------------------
    ("predict-not-an-image", setup_not_image, ["predict", "{zoo}", "{img}"], "cat.png", ["{zoo}", "{img}"]),
    ("predict-decompression-bomb", setup_bomb, ["predict", "{zoo}", "{img}"], "bomb.png", ["{zoo}", "{img}"]),
    ("profile-not-onnx", setup_not_onnx, ["profile", "{zoo}", "--runs", "1", "--warmup", "0"],
     "not an ONNX model", ["{zoo}"]),
    # --- issue 32: every zoo reader checks the graph against its entry; flags and settings blamed on themselves ----
    ("pick-swapped-model", setup_swapped, ["pick", "{zoo}"], "embedded 'name'", ["{zoo}"]),
    ("profile-swapped-model", setup_swapped, ["profile", "{zoo}", "--runs", "1", "--warmup", "0"],
     "embedded 'name'", ["{zoo}"]),
    ("predict-fifo", setup_fifo, ["predict", "{zoo}", "{img}"], "a FIFO, not a regular file", ["{zoo}"]),
    ("pick-nan-latency", setup_zoo_only, ["pick", "{zoo}", "--max-latency-ms", "nan"], "--max-latency-ms nan",
     ["{zoo}"]),
    ("pick-nan-accuracy", setup_zoo_only, ["pick", "{zoo}", "--min-accuracy", "nan"], "--min-accuracy nan",
     ["{zoo}"]),
    ("pick-flops-overflow", setup_zoo_only, ["pick", "{zoo}", "--max-flops", "1e400"], "--max-flops '1e400'",
     ["{zoo}"]),
    ("pick-threads-negative", setup_zoo_only, ["pick", "{zoo}", "--max-latency-ms", "5", "--threads", "-1"],
     "--threads -1: expected", ["{zoo}"]),
    ("pick-no-manifest-hint", setup_no_manifest, ["pick", "{zoo}"], "`klas export --run-dir", ["{run}"]),
    ("pick-short-classes", setup_short_classes, ["pick", "{zoo}"], "class names for num_classes", ["{zoo}"]),
    ("config-epochs-huge", setup_config("", "--set"), CFG_RUN + ["--dry-run", "--set",
                                                                "probes.epochs=99999999999999999999999"],
     "at most 2,147,483,647", []),
    ("env-pixels-abc", setup_image, ["predict", "{zoo}", "{img}"], "KLAS_MAX_IMAGE_PIXELS='abc'", ["{zoo}"],
     {}, {"KLAS_MAX_IMAGE_PIXELS": "abc"}),
    ("env-kl-impl-bogus", setup_run, ["score", "--run-dir", "{run}", "--force"], "KLAS_KL_IMPL='bogus'", [], {},
     {"KLAS_KL_IMPL": "bogus"}),
    ("run-json-wrong-shape", setup_run_json_list, ["run", "{base_cfg}", "--run-dir", "{run}", "--dry-run"],
     "expected a JSON object", ["{run}"]),
    ("data-idx-float", setup_idx_float, ["run", "{base_cfg}", "--run-dir", "{tmp}/r", "--set", "data.root=\"{root}\"",
                                         "--until", "probes"], "IDX data type float32", ["{root}"]),
    ("hub-offline-one-line", setup_hub_config, ["run", "{cfg}", "--run-dir", "{tmp}/r", "--until", "probes"],
     "cannot fetch its pretrained weights", ["{cfg}"]),
    ("probe-checkpoint-disk-full", setup_run, ["probe", "--run-dir", "{run}", "--set", "probes.epochs=2"],
     "checkpoint.pt",
     ["{run}/probes/checkpoint.pt"], {"enospc_save": 1}),
    # --- a full disk while exporting: one line naming the file, the old zoo intact ---------------------------
    ("export-disk-full", setup_run, ["export", "--run-dir", "{run}", "--force"], "no space left",
     ["{run}/zoo"], {"enospc": 1}),
]
print(f"test_battery: {len(CASES)} table cases + 2 fault scenarios (kill during export at 4 moments, two "
      f"concurrent runs)")


def _fill(x, ph):
    return x.format(**ph) if isinstance(x, str) else x


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_battery(case, base, tmp_path):
    name, setup, argv, needle, guard = case[:5]
    fault = case[5] if len(case) > 5 else {}
    env = case[6] if len(case) > 6 else {}
    ph = dict(tmp=tmp_path, base_cfg=base["cfg"], base_zoo=base["zoo"])
    ph.update(setup(base, tmp_path))
    argv = [_fill(a, ph) for a in argv]
    fault = {k: _fill(v, ph) for k, v in fault.items()}
    guarded = [Path(_fill(g, ph)) for g in guard]
    before = {g: tree_hashes(g) for g in guarded}
    base_before = tree_hashes(base["run"])
    t0 = time.time()
    rc, out, err = base["server"].run(argv, cwd=ph.get("cwd", tmp_path), fault=fault, env=env)
    took = time.time() - t0
    lines = error_lines(err)
    assert rc not in (0, 99) and rc > 0, (name, rc, out[-800:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert len(lines) == 1, (name, lines)
    assert needle in lines[0], (name, needle, lines[0])
    if ph.get("culprit"):
        assert ph["culprit"] in lines[0], (name, ph["culprit"], lines[0])
    assert "internal error" not in lines[0], lines[0]
    if ph.get("culprit") == "--set":
        assert "bad.toml" not in lines[0], lines[0]  # a bad --set is blamed on --set, not on the config file
    for g in guarded:
        assert tree_hashes(g) == before[g], (name, g)  # nothing lost or half-written
    assert tree_hashes(base["run"]) == base_before  # the shared run is never touched
    if "pwned" in ph:
        assert not ph["pwned"].exists(), "the pickle's code ran"
    if name.startswith("config-") and "newrun" in " ".join(argv):
        assert not (tmp_path / "newrun").exists()  # refused before any folder is made (--dry-run or not)
    if name == "hub-offline-one-line":
        assert took < 45, took  # no minute of retries before the one line
    if name == "probe-checkpoint-disk-full":
        assert "No space left" in lines[0] or "no space left" in lines[0], lines[0]
        assert not [p.name for p in (tmp_path / "run" / "probes").iterdir() if p.name.endswith(".tmp")]
    if name == "export-disk-full":
        assert not list((tmp_path / "run").glob(".zoo.staging-*"))  # the half-built zoo is cleaned up
        assert base["server"].run(["verify", tmp_path / "run" / "zoo"])[0] == 0


def _verify_ok(server, zoo):
    rc, out, err = server.run(["verify", zoo])
    assert rc == 0, (zoo, out, err)


def _dry_run_lines(server, cfg, run, *sets):
    rc, out, err = server.run(["run", cfg, "--run-dir", run, "--dry-run"] + [a for s in sets for a in ("--set", s)])
    assert rc == 0, err
    return {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("[")}


def test_kill_during_export_leaves_old_or_new_zoo(base, tmp_path):
    """The export killed at four moments: each state holds a zoo that verifies (the old or the new one) and the
    next `klas run` does not call a broken stage up to date; a real resume after the real SIGKILL finishes."""
    server = base["server"]
    run, snaps = tmp_path / "run", tmp_path / "snaps"
    shutil.copytree(base["run"], run, symlinks=True)
    snaps.mkdir()
    old = tree_hashes(base["zoo"])
    rc, out, err = server.run(["export", "--run-dir", run, "--force"],
                              fault={"snapshots": str(snaps), "run": str(run)})
    assert rc == -9, (rc, err[-2000:])  # killed for real, right after the swap
    states = {p.name: p for p in snaps.iterdir()} | {"killed-after-swap": run}
    assert set(states) == {"first-model-staged", "models-staged-no-manifest", "manifest-staged-before-swap",
                           "killed-after-swap"}
    for what, state in states.items():
        _verify_ok(server, state / "zoo")
        now = tree_hashes(state / "zoo")
        if what != "killed-after-swap":
            assert now == old, what  # before the swap: the old zoo, untouched
        else:
            assert set(now) == set(old)  # the new zoo, whole (same models; the manifest's timestamps differ)
        lines = _dry_run_lines(server, base["cfg"], state)
        assert "skip" not in lines["export"], (what, lines["export"])  # a record was deleted before the re-run
    rc, out, err = server.run(["run", base["cfg"], "--run-dir", run])  # resume; the killed export's lock is taken over
    assert rc == 0, err[-2000:]
    assert "taking over the lock" in out and "export: done in" in out and "Traceback" not in out + err
    assert not list(run.glob(".zoo.staging-*"))
    _verify_ok(server, run / "zoo")
    assert "skip" in _dry_run_lines(server, base["cfg"], run)["export"]


def test_two_concurrent_runs_one_run_dir(base, tmp_path):
    """The second `klas run` on a directory in use gets one line naming the holder; the zoo then verifies."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    # the first run holds its export until told to go on, so the second surely starts while the first works (a
    # fast export would otherwise finish before a second Python process has imported torch)
    inside, go = tmp_path / "in-export", tmp_path / "go"
    hold = ("import pathlib, sys, time, klas.cli, klas.stages.s6_export as s6\n"
            "orig = s6.export_models\n"
            "def held(*a, **k):\n"
            f"    pathlib.Path({str(inside)!r}).write_text('x')\n"
            f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
            "    return orig(*a, **k)\n"
            "s6.export_models = held\n"
            "sys.argv = ['klas'] + sys.argv[1:]\n"
            "sys.exit(klas.cli.main(sys.argv[1:]))\n")
    first = subprocess.Popen([sys.executable, "-c", hold, "run", str(base["cfg"]), "--run-dir", str(run),
                              "--set", "export.parity_images=40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not inside.exists() and first.poll() is None:
            time.sleep(0.1)
        assert inside.exists(), first.communicate()[1][-2000:]
        assert f"pid {first.pid}" in (run / ".lock").read_text()
        second = klas_proc("run", base["cfg"], "--run-dir", run, "--set", "export.parity_images=30")
        go.write_text("go")
        lines = error_lines(second.stderr)
        assert second.returncode != 0 and len(lines) == 1, second.stderr
        assert f"in use by pid {first.pid}" in lines[0] and "Traceback" not in second.stderr + second.stdout
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    _verify_ok(base["server"], run / "zoo")
    assert "skip" in _dry_run_lines(base["server"], base["cfg"], run, "export.parity_images=40")["export"]


def test_restricted_unpickler_reads_numpy_arrays_of_numpy_1_and_2_and_refuses_the_rest(tmp_path):
    """What the CIFAR-100 files need loads (arrays pickled by numpy 2.x, and by numpy 1.x, whose pickles name
    numpy.core.multiarray._reconstruct); a pickle naming any other callable is refused and never runs."""
    import pickle

    import numpy as np

    from klas.data.safety import load_pickle, loads_pickle
    from klas.errors import KlasError

    d = {"data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072), "fine_labels": [3, 99], b"raw": "x"}
    raw2 = pickle.dumps(d, protocol=2)  # GLOBAL opcodes name modules as text lines, as numpy 1.x wrote them
    old = raw2.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert old != raw2
    for blob in (raw2, old, pickle.dumps(d, protocol=4)):
        got = loads_pickle(blob)
        assert np.array_equal(got["data"], d["data"]) and got["fine_labels"] == [3, 99]
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))
    (tmp_path / "evil").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    refused = r"evil: not a dataset pickle \(refusing global (__builtin__|builtins)\.eval"
    with pytest.raises(KlasError, match=refused) as e:
        load_pickle(tmp_path / "evil")
    assert "\n" not in str(e.value) and not marker.exists()


# --- issue 32: concurrent writers of one zoo, a full disk during checkpoints, hints that work ---------------------

HOLD = ("import pathlib, sys, time, klas.cli, klas_runtime.profile as pr\n"
        "orig, inside, go = pr.latency_record, pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "def held(*a, **k):\n"
        "    inside.write_text('x')\n"
        "    while not go.exists(): time.sleep(0.05)\n"
        "    return orig(*a, **k)\n"
        "pr.latency_record = held\n"
        "sys.argv = ['klas'] + sys.argv[3:]\n"
        "sys.exit(klas.cli.main(sys.argv[1:]))\n")


def _held_profile(tmp, zoo, *flags):
    """`klas profile ZOO` in its own process, stopped inside its first measurement (after reading the manifest)
    until ``go`` is touched; returns (process, go)."""
    inside, go = tmp / "in-profile", tmp / "go"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(inside), str(go), "profile", str(zoo), "--runs", "2",
                          "--warmup", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not inside.exists() and p.poll() is None:
        time.sleep(0.05)
    assert inside.exists(), p.communicate()[1][-2000:]
    return p, go


def _threads(zoo) -> list[set[int]]:
    return [{r["threads"] for r in e["latency"]} for e in _manifest(zoo)["models"]]


def _while_profile_held(tmp, zoo, action, *flags) -> tuple[str, str]:
    """Run ``action`` while a profile of ``zoo`` is held between measuring and writing, then let it write; the
    held profile must succeed without a traceback; its (stdout, stderr)."""
    first, go = _held_profile(tmp, zoo, *flags)
    try:
        action()
        go.write_text("go")
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "Traceback" not in out + err, err[-2000:]
    return out, err


def test_two_concurrent_profiles_keep_both_records(base, tmp_path):
    """`klas profile` twice at once on one zoo: the later writer merges into the manifest as it is when it
    writes, so both runs' records are there (one was lost before the zoo had a lock)."""
    zoo = _zoo(base, tmp_path)

    def second_profile():
        rc, out, err = base["server"].run(["profile", zoo, "--runs", "2", "--warmup", "0", "--threads", "3"])
        assert rc == 0 and "Traceback" not in out + err, err[-2000:]

    _while_profile_held(tmp_path, zoo, second_profile, "--threads", "2")
    assert all({2, 3} <= t for t in _threads(zoo)), _threads(zoo)
    _verify_ok(base["server"], zoo)


def test_profile_while_export_swaps_in_a_new_zoo(base, tmp_path):
    """A profile still measuring the old zoo when `klas export --force` swaps in a new one (other parity images:
    other files) writes none of its stale figures over the new manifest, says so, and the zoo verifies."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    before = {e["name"]: e["sha256"] for e in _manifest(run / "zoo")["models"] if "file" in e}

    def export_swap():
        rc, _, err = base["server"].run(["export", "--run-dir", run, "--force", "--set", "export.parity_images=30"])
        assert rc == 0, err[-2000:]

    out, _ = _while_profile_held(tmp_path, run / "zoo", export_swap, "--threads", "2")
    after = {e["name"]: e["sha256"] for e in _manifest(run / "zoo")["models"] if "file" in e}
    assert after != before  # the export did change the files
    assert "changed while being measured" in out
    _verify_ok(base["server"], run / "zoo")


def test_reexport_keeps_latency_of_unchanged_models_or_says_so(base, tmp_path):
    """Records `klas profile` added survive `klas export --force` for every model whose file is unchanged; those
    of changed files are dropped with one line saying how many."""
    server, run = base["server"], tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    rc, out, err = server.run(["profile", run / "zoo", "--runs", "2", "--warmup", "0", "--threads", "2"])
    assert rc == 0, err[-2000:]
    before = {e["name"]: e["sha256"] for e in _manifest(run / "zoo")["models"] if "file" in e}
    rc, out, err = server.run(["export", "--run-dir", run, "--force"])
    assert rc == 0 and "Traceback" not in out + err, err[-2000:]
    changed = 0
    for e in _manifest(run / "zoo")["models"]:
        if "file" in e and e["sha256"] == before[e["name"]]:
            assert 2 in {r["threads"] for r in e["latency"]}, e["name"]
        elif "file" in e:
            changed += 1
    assert (f"latency record(s) of {changed} entr" in out) if changed else "dropped" not in out
    _verify_ok(server, run / "zoo")


def test_full_disk_during_a_probe_checkpoint_then_resume(base, tmp_path):
    """The disk fills up while epoch 2's checkpoint is written: one line naming checkpoint.pt and the cause, epoch
    1's checkpoint intact; once there is space again the same command resumes after epoch 1 and finishes."""
    import torch

    server, run = base["server"], tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    argv = ["probe", "--run-dir", run, "--force", "--set", "probes.epochs=2"]
    rc, out, err = server.run(argv, fault={"enospc_save": 2})
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out + err, err[-2000:]
    assert "checkpoint.pt" in lines[0] and "o space left" in lines[0], lines[0]
    assert torch.load(run / "probes" / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 1
    assert not [p for p in (run / "probes").iterdir() if p.name.endswith(".tmp")]
    rc, out, err = server.run(argv[:-3] + ["--set", "probes.epochs=2"])
    assert rc == 0 and "resuming after epoch 1/2" in out, (out[-2000:], err[-2000:])


def test_every_hint_is_a_command_that_works(base, tmp_path):
    """The commands the CLI prints as hints (a zoo without a manifest, latency never measured here, a precision the
    zoo lacks) run as printed and do what they say."""
    import re
    import shlex

    server = base["server"]
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    (run / "zoo" / "manifest.json").unlink()
    hints = []
    for argv in (["pick", run / "zoo"], ["pick", run / "zoo", "--max-latency-ms", "5", "--threads", "0"],
                 ["pick", run / "zoo", "--max-latency-ms", "5", "--batch", "2"]):
        rc, out, err = server.run(argv)
        found = re.findall(r"`(klas [^`]+)`", err)
        assert rc == 2 and found, err
        hints.append(found[-1])
        hint_rc, hint_out, hint_err = server.run(shlex.split(found[-1])[1:] + (
            ["--runs", "2", "--warmup", "0"] if found[-1].startswith("klas profile") else []))
        assert hint_rc == 0, (found[-1], hint_err[-2000:])
    _verify_ok(server, run / "zoo")
    rc, out, err = server.run(["pick", run / "zoo", "--max-latency-ms", "1e9", "--batch", "2"])
    assert rc == 0, err  # measured by the hint: the budget is now met
    assert "klas export --run-dir" in hints[0] and "--threads 0" in hints[1]
