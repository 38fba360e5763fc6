#!/usr/bin/env bash
# One idempotent setup: Debian's Fashion-MNIST, a virtual environment with the pinned stack, klas installed
# editable with its C++ extension. A second run finds everything in place and says so in one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DATA=/usr/share/datasets/fashion-mnist
say() { printf '[setup] %s\n' "$*"; }

if [ -f "$DATA/train-images-idx3-ubyte.gz" ] && [ -f "$DATA/t10k-labels-idx1-ubyte.gz" ]; then
  say "Fashion-MNIST present in $DATA"
else
  say "installing Debian package dataset-fashion-mnist (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  say "Fashion-MNIST installed in $DATA"
fi

DOCS=$(ls -d /usr/share/doc/python3*/html/_sources 2>/dev/null | head -1 || true)
if [ -n "$DOCS" ]; then
  say "Python documentation sources present in $DOCS (the language-model corpus)"
else
  say "installing Debian package python3-doc (apt-get): the embedded language models' text"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-doc >/dev/null
  say "python3-doc installed"
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

req_hash=$(cat requirements.txt | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.klas-requirements" 2>/dev/null)" = "$req_hash" ]; then
  say "python packages up to date (requirements.txt unchanged)"
else
  say "installing python packages (torch 2.14.1 CUDA build, ~6 GB; uv: ~1.5 min the first time, pip: ~2.5 min)"
  # NOTE: uv (from PyPI) unpacks and byte-compiles the wheels on every core; pip does it one file at a time (138 s vs
  # 41 s + 37 s of byte-compiling here). Its cache sits in the venv, on the venv's filesystem, so the venv's files
  # are hard links into it, not copies. Not --no-compile: where PYTHONDONTWRITEBYTECODE=1 (as on our machines)
  # nothing would ever write the .pyc files, and every process (the tests start hundreds) would compile torch again:
  # 19 s per import instead of 10. pip stays the fallback where uv cannot be installed.
  if "$VENV/bin/pip" install -q --disable-pip-version-check uv==0.13.9 2>/dev/null; then
    UV_CACHE_DIR=${UV_CACHE_DIR:-$VENV/.uv-cache} "$VENV/bin/uv" pip install -q --compile-bytecode \
      --python "$VENV/bin/python" -r requirements.txt pip==26.3 setuptools==84.2.1 wheel==0.48.0
  else
    say "uv unavailable: installing with pip"
    "$VENV/bin/pip" install -q --disable-pip-version-check pip==26.3 setuptools==84.2.1 wheel==0.48.0
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  fi
  echo "$req_hash" > "$VENV/.klas-requirements"
fi

# klas-runtime (runtime/: the torch-free pick/predict/profile/verify package klas depends on), editable, before klas.
rt_hash=$(cat $(find runtime -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' \) -not -path '*/build/*' \
  -not -path '*.egg-info/*' | sort) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.klas-runtime-build" 2>/dev/null)" = "$rt_hash" ] && "$VENV/bin/python" -c "import klas_runtime" 2>/dev/null; then
  say "klas-runtime installed (runtime/ sources unchanged)"
else
  say "installing klas-runtime (editable, runtime/)"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e ./runtime 2>&1 \
    | grep -vE "^\s*$|DEPRECATION|setuptools|!!|\*\*\*\*|WheelFile|wheel_obj|Please|See https|^ +" || true
  echo "$rt_hash" > "$VENV/.klas-runtime-build"
fi

src_hash=$(cat setup.py $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.klas-build" 2>/dev/null)" = "$src_hash" ] && "$VENV/bin/python" -c "import klas" 2>/dev/null; then
  say "klas installed (extension sources unchanged)"
else
  say "installing klas (editable) and building its C++ extension"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
    | grep -vE "^\s*$|DEPRECATION|setuptools|!!|\*\*\*\*|WheelFile|wheel_obj|Please|See https|^ +" || true
  echo "$src_hash" > "$VENV/.klas-build"
fi
"$VENV/bin/python" -c "import klas.ops as o; print('[setup] klas ready; KL op implementations:', ', '.join(o.available_impls()) if hasattr(o, 'available_impls') else 'reference')"
