"""The klas command: --help everywhere, one-line errors with a non-zero exit."""
import argparse
import subprocess
import sys

import pytest

from klas.cli import build_parser, main


def _all_paths(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(_all_paths(build_parser()))
    assert ("anchors", "train") in paths and ("anchors", "eval") in paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        assert "usage: klas" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "klas", "anchors", "list"], capture_output=True, text=True, check=True)
    assert "fmnist-deit" in out.stdout and "embedded" in out.stdout


@pytest.mark.parametrize("argv,needle", [
    (["anchors", "eval", "nope"], "family 'nope': unknown"),
    (["anchors", "eval", "deit"], "not an embedded family"),
    (["anchors", "eval", "fmnist-deit", "--data-root", "/nonexistent/fm"], "/nonexistent/fm"),
])
def test_bad_input_is_one_line(argv, needle):
    r = subprocess.run([sys.executable, "-m", "klas", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klas: error:") and needle in lines[0], r.stderr
