"""The torch-free runtime distribution (runtime/, ``klas-runtime``) installed alone: a fresh virtual environment made
from the base interpreter gets ``pip install runtime/`` (numpy, onnxruntime, Pillow come from the package index) and
nothing else; torch, timm, matplotlib and klas are absent there, and ``klas-runtime verify / pick / predict`` on a
real exported zoo (a cascade entry included) agree with onnxruntime run here. Also: ``klas`` and ``klas-runtime``
share the same subcommands."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("torch", "timm", "matplotlib", "klas")


def _base_python() -> str:
    """The interpreter the test environment's venv was made from (not the venv: its site-packages hold torch)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if Path(base).exists() else sys.executable


def _fresh_runtime_env(tmp_path: Path) -> tuple[Path, dict]:
    """A new venv holding klas-runtime (non-editable, built from a copy of runtime/) and its dependencies only."""
    venv = tmp_path / "venv"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Build from a copy: a build in runtime/ itself would leave build/ and *.egg-info in the checkout.
    src = tmp_path / "runtime-src"
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # This environment's pip, pointed at the new interpreter (--python): installs into the new venv only.
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-compile", "--quiet",
                        "--disable-pip-version-check", str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return venv, env


def _run(venv: Path, env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "klas-runtime"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _real_image(path: Path) -> tuple[Path, np.ndarray]:
    """The first Fashion-MNIST test image as a PNG file (and its pixels)."""
    from PIL import Image

    from klas.data import load_dataset

    pixels = load_dataset("fashion-mnist", "test").images[0, 0].numpy()
    Image.fromarray(pixels).save(path)
    return path, pixels


def _expected(zoo: Path, max_flops: float) -> dict:
    """Oracle from the manifest as plain JSON: the most accurate model within the budget (ties: fewer FLOPs)."""
    models = json.loads((zoo / "manifest.json").read_text())["models"]
    fits = [m for m in models if m["flops"] <= max_flops]
    return max(fits, key=lambda m: (m["test_acc"], -m["flops"], m["name"]))


def test_runtime_installs_alone_and_runs_on_an_exported_zoo(exported_zoo, runtime_env, tmp_path):
    from klas_runtime.runtime import Zoo

    venv, env = runtime_env
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    probe = ("import importlib.util, json, klas_runtime\n"
             f"print(json.dumps([[m for m in {ABSENT!r} if importlib.util.find_spec(m)], klas_runtime.__file__]))")
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    present, where = json.loads(r.stdout)
    assert present == [] and Path(where).is_relative_to(venv), (present, where)

    r = _run(venv, env, tmp_path, "verify", exported_zoo)
    assert r.returncode == 0 and r.stderr == "" and "4 models" in r.stdout, r.stdout + r.stderr

    flops = sorted(m["flops"] for m in Zoo(exported_zoo).models)
    budget = flops[-2]  # everything but the most expensive model
    want = _expected(exported_zoo, budget)
    r = _run(venv, env, tmp_path, "pick", exported_zoo, "--max-flops", budget, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == want["file"] and "why:" in r.stdout
    here = Zoo(exported_zoo).pick(max_flops=budget, device="cpu", with_session=False)
    assert here.name == want["name"]

    img, pixels = _real_image(tmp_path / "fashion-mnist-test-0.png")
    r = _run(venv, env, tmp_path, "predict", exported_zoo, "--max-flops", budget, "--device", "cpu", img)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"[predict] model {want['name']} ")
    got = re.fullmatch(rf"{re.escape(str(img))}: (.+) \(class (\d+), p=([0-9.]+)\)", r.stdout.splitlines()[-1])
    assert got, r.stdout
    # onnxruntime directly, on this side, with the manifest's preprocessing written out
    spec = want["input"]
    x = ((pixels.astype(np.float64) * spec["scale"] - spec["mean"][0]) / spec["std"][0]).astype(np.float32)
    sess = ort.InferenceSession(str(exported_zoo / want["file"]), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {spec["name"]: x[None, None]})[0][0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = int(probs.argmax())
    assert (got.group(1), int(got.group(2))) == (want["output"]["classes"][k], k)
    assert abs(float(got.group(3)) - probs[k]) <= 1.5e-3

    # verify names every problem, one line each, and fails
    bad = tmp_path / "bad-zoo"
    shutil.copytree(exported_zoo, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    first, second = manifest["models"][0], manifest["models"][1]
    data = bytearray((bad / first["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / first["file"]).write_bytes(bytes(data))
    (bad / second["file"]).write_bytes(b"not an onnx model")
    second["sha256"] = hashlib.sha256(b"not an onnx model").hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = _run(venv, env, tmp_path, "verify", bad)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 2, r.stdout + r.stderr
    assert first["file"] in lines[0] and "sha256" in lines[0]
    assert second["file"] in lines[1] and "not an ONNX model" in lines[1]
    # a cascade (two of the zoo's models, max-softmax threshold; schema version 2) runs there too
    from test_cascade_runtime import FIRST, SECOND, add_cascade, reference_cascade

    casc = tmp_path / "cascade-zoo"
    shutil.copytree(exported_zoo, casc)
    c = add_cascade(casc)
    entry = c["entry"]
    r = _run(venv, env, tmp_path, "verify", casc)
    assert r.returncode == 0 and "4 models and 1 cascade(s)" in r.stdout, r.stdout + r.stderr
    avg = str(entry["flops_avg"]["val"])
    r = _run(venv, env, tmp_path, "pick", casc, "--max-flops", avg, "--by-average", "--device", "cpu")
    files = {m["name"]: m["file"] for m in json.loads((casc / "manifest.json").read_text())["models"]
             if "file" in m}
    assert r.returncode == 0 and r.stdout.splitlines()[0] == f"{files[FIRST]} {files[SECOND]}", r.stdout + r.stderr
    _, probs, deferred = reference_cascade(*c["logits"], entry["threshold"])
    k = int(np.flatnonzero(deferred)[0])  # an image the large member answers
    from PIL import Image

    Image.fromarray(c["pixels"][k, 0]).save(tmp_path / "deferred.png")
    r = _run(venv, env, tmp_path, "predict", casc, "--max-flops", avg, "--by-average", "--device", "cpu",
             tmp_path / "deferred.png")
    assert r.returncode == 0 and r.stdout.startswith(f"[predict] model {entry['name']} "), r.stdout + r.stderr
    cls = int(probs[k].argmax())
    got = re.search(r"\(class (\d+), p=([0-9.]+), answered by (.+)\)$", r.stdout.splitlines()[-1])
    assert got and int(got.group(1)) == cls and got.group(3) == SECOND, r.stdout
    assert abs(float(got.group(2)) - probs[k, cls]) <= 1.5e-3

    r = _run(venv, env, tmp_path, "pick", tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("klas-runtime: error: ")


def _subcommand_flags(parser) -> dict[str, list]:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: sorted([(tuple(a.option_strings), a.dest, a.default, a.type, a.nargs, a.choices, a.help)
                          for a in p._actions if a.dest != "help"], key=repr)
            for name, p in sub.choices.items() if name in ("pick", "predict", "profile", "verify")}


def test_klas_and_klas_runtime_share_pick_predict_profile_verify(exported_zoo, capsys):
    from klas import cli as klas_cli
    from klas_runtime import cli as runtime_cli

    ours, theirs = _subcommand_flags(klas_cli.build_parser()), _subcommand_flags(runtime_cli.build_parser())
    assert set(ours) == {"pick", "predict", "profile", "verify"} and ours == theirs
    assert klas_cli.main(["verify", str(exported_zoo)]) == 0
    assert "4 models" in capsys.readouterr().out
    # a runtime error (klas_runtime.errors.ZooError) through the klas command: one line, exit 2
    assert klas_cli.main(["pick", str(exported_zoo), "--max-flops", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klas: error: max_flops 1 is below the cheapest model") and err.count("\n") == 1
