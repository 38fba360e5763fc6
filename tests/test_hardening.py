"""Bad input from the environment and the run folder (issue 32's cases): one line naming what is wrong and what
was expected, a non-zero exit, no traceback -- and nothing read at import time that could break every command."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from klas.errors import KlasError
from klas_runtime.errors import ZooError


def _klas(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "klas", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_bad_pixel_limit_is_one_line_where_an_image_is_decoded(tmp_path, monkeypatch, value):
    from PIL import Image

    from klas.data.safety import open_image
    from klas_runtime.preprocess import open_checked_image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    r = _klas("--help", env={"KLAS_MAX_IMAGE_PIXELS": value})  # read when used, not on import
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-500:]
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", value)
    for read in (lambda: open_image(img), lambda: open_checked_image(img)):
        with pytest.raises(ZooError, match=rf"^KLAS_MAX_IMAGE_PIXELS='{value}': expected a positive whole number"):
            read()
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", "63")  # a valid limit still applies
    with pytest.raises(ZooError, match="refusing to decode it"):
        open_image(img)
    monkeypatch.setenv("KLAS_MAX_IMAGE_PIXELS", "64")
    assert open_image(img).size == (8, 8)


def test_bad_kl_implementation_in_the_environment_is_one_line(monkeypatch):
    import torch

    from klas.ops import pairwise_softmax_kl

    monkeypatch.setenv("KLAS_KL_IMPL", "bogus")
    with pytest.raises(KlasError, match=r"^KLAS_KL_IMPL='bogus': expected one of reference") as e:
        pairwise_softmax_kl(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)  # still a ValueError to Python callers


@pytest.mark.parametrize("content", ["[1, 2]", '{"dataset": "fashion-mnist"}', '"fmnist-deit"'])
def test_run_json_of_the_wrong_shape_names_the_file(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content)
    r = _klas("run", "--run-dir", run, "--dry-run")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-800:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"{run / 'run.json'}: expected a JSON object naming the run's family" in line
    assert (run / "run.json").read_text() == content  # nothing rewritten
