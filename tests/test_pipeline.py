"""`klas run`: config validation, stage skipping on unchanged inputs, exact re-runs after a config change."""
import pytest

from klas import pipeline
from klas.config import DEFAULTS, load_config, validate
from klas.errors import KlasError
from klas.io import save_json
from klas.pipeline import Stage, run_pipeline


@pytest.mark.parametrize("raw,needle", [
    ({"probes": {"epoch": 3}}, "unknown key [probes] epoch"),
    ({"probez": {}}, "unknown section [probez]"),
    ({"probes": {"epochs": "3"}}, "[probes] epochs = '3': expected int"),
    ({"selection": {"tau": True}}, "expected float"),
    ({"selection": {"tau": -0.1}}, "expected >= 0"),
    ({"data": {"root": "/no/such/dataset"}}, "[data] root = '/no/such/dataset': directory not found"),
    ({"run": {"family": "gpt"}}, "[run] family = 'gpt'"),
])
def test_config_errors(raw, needle):
    with pytest.raises(KlasError) as e:
        validate(raw, "my.toml")
    assert needle in str(e.value) and str(e.value).startswith("my.toml:") and "\n" not in str(e.value)


def test_embedded_default_config_spells_out_every_field(tmp_path):
    cfg = load_config()
    assert cfg == validate({})  # the shipped file equals the defaults
    assert validate({"selection": {"tau": 1}})["selection"]["tau"] == 1.0  # ints are fine floats
    bad = tmp_path / "c.toml"
    bad.write_text("[probes\nepochs = 1")
    with pytest.raises(KlasError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(KlasError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    assert set(cfg) == set(DEFAULTS)


def _fake_stages(calls):
    def make(name, out):
        def run(cfg, run_dir):
            calls.append(name)
            save_json({"by": name}, run_dir.stage(name) / out)
            return {"n": len(calls)}
        return run
    return [Stage("probes", ("probes",), (), ("probes.json",), make("probes", "probes.json")),
            Stage("scores", ("scores",), ("probes",), ("scores.json",), make("scores", "scores.json")),
            Stage("selection", ("selection",), ("scores",), ("selection.json",), make("selection", "selection.json"))]


def test_stages_skip_and_rerun_exactly(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "_stage_fns", lambda: _fake_stages(calls))
    cfg = validate({})
    run_pipeline(cfg, tmp_path)
    assert calls == ["probes", "scores", "selection"]
    run_pipeline(cfg, tmp_path)  # unchanged inputs: everything skipped
    assert calls == ["probes", "scores", "selection"]
    assert capsys.readouterr().out.count("up to date, skipped") == 3
    # a selection-only change re-runs selection alone
    run_pipeline(validate({"selection": {"tau": 0.1}}), tmp_path)
    assert calls[3:] == ["selection"]
    # a scores change re-runs scores and everything downstream
    run_pipeline(validate({"selection": {"tau": 0.1}, "scores": {"temperature": 2.0}}), tmp_path)
    assert calls[4:] == ["scores", "selection"]
    # a deleted output (or an interrupted stage that wrote no record) re-runs that stage and its dependants
    (tmp_path / "scores" / "scores.json").unlink()
    run_pipeline(validate({"selection": {"tau": 0.1}, "scores": {"temperature": 2.0}}), tmp_path)
    assert calls[6:] == ["scores", "selection"]
    run_pipeline(cfg, tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert "probes      skip" in out and "re-run (inputs changed)" in out
    assert calls[8:] == []


def test_run_dir_of_another_family(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_stage_fns", lambda: _fake_stages([]))
    run_pipeline(validate({}), tmp_path)
    with pytest.raises(KlasError, match="belongs to family 'fmnist-deit', not 'deit'"):
        run_pipeline(validate({"run": {"family": "deit"}}), tmp_path)
    with pytest.raises(KlasError, match="--until 'nope'"):
        run_pipeline(validate({}), tmp_path, until="nope")
