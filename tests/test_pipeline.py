"""The stage contract and the one cache: settings derived from the stage dataclasses (TOML, --set, CLI flags agree,
no default defined twice), checked at load with errors naming the key and its source; stages skipped exactly when
their config and upstream artifacts are unchanged; a single-stage command makes the later stages stale."""
import argparse
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from klas import config as kc
from klas import pipeline
from klas.cli import build_parser
from klas.contract import Artifact, specs
from klas.errors import KlasError
from klas.stages import STAGES

from _stitch_helpers import TINY_STAGES


@pytest.mark.parametrize("raw,needle", [
    ({"probes": {"epoch": 3}}, "unknown key [probes] epoch"),
    ({"probez": {}}, "unknown section [probez]"),
    ({"probes": {"epochs": "3"}}, "[probes] epochs = '3': expected int"),
    ({"probes": {"epochs": 0}}, "[probes] epochs = 0: expected >= 1"),
    ({"selection": {"tau": True}}, "expected float"),
    ({"selection": {"tau": -0.1}}, "expected >= 0"),
    ({"selection": {"method": "nope"}}, "[selection] method = 'nope': expected one of klas"),
    ({"scores": {"impl": "bogus"}}, "[scores] impl = 'bogus': expected one of auto"),
    ({"scores": {"temperature": 0}}, "[scores] temperature = 0: expected > 0"),
    ({"finetune": {"lr": -1.0}}, "[finetune] lr = -1.0: expected > 0"),
    ({"finetune": {"init": {"method": "magic"}}}, "[finetune] init.method = 'magic'"),
    ({"finetune": {"init": 3}}, "[finetune] init is a table of keys"),
    ({"evaluation": {"latency_repeats": 0}}, "[evaluation] latency_repeats = 0: expected >= 1"),
    ({"evaluation": {"test_subset": -1}}, "[evaluation] test_subset = -1: expected >= 1"),
    ({"export": {"opset": 3}}, "[export] opset = 3: expected >= 18"),
    ({"run": {"threads": -2}}, "[run] threads = -2: expected >= 1"),
    ({"run": {"family": "gpt"}}, "[run] family = 'gpt': expected one of"),
    ({"scores": {"lam": float("nan")}}, "expected a finite number"),
])
def test_config_errors_name_the_key_and_file(raw, needle):
    with pytest.raises(KlasError) as e:
        kc.load_config(raw=raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_errors_name_where_the_value_came_from(tmp_path):
    p = tmp_path / "my.toml"
    p.write_text("[selection]\nmethod = 'nope'\n")
    with pytest.raises(KlasError, match=r"^.*my\.toml: \[selection\] method = 'nope'"):
        kc.load_config(p)
    with pytest.raises(KlasError, match=r"^--set selection\.tau = -1: expected >= 0"):
        kc.load_config(sets=["selection.tau=-1"])
    with pytest.raises(KlasError, match=r"^--set 'tau': expected section\.key=value"):
        kc.load_config(sets=["tau"])
    with pytest.raises(KlasError, match=r"^--tau -1: expected >= 0"):
        kc.load_config(flags={("selection", ("tau",)): (-1, "--tau")})
    for content, needle in (("[probes\nepochs = 1", "invalid TOML"),
                            (None, r"file not found \(expected a TOML config file\)")):
        if content is not None:
            p.write_text(content)
        with pytest.raises(KlasError, match=needle):
            kc.load_config(p if content is not None else tmp_path / "missing.toml")
    with pytest.raises(KlasError, match="is a directory"):
        kc.load_config(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KlasError, match="not a text file"):
        kc.load_config(tmp_path / "bin.toml")


def test_none_words_and_layers():
    cfg = kc.load_config(raw={"probes": {"train_subset": 100}}, sets=["probes.train_subset=\"all\"",
                                                                   "finetune.init.steps=7", "selection.tau=1"])
    assert cfg.probes.train_subset is None and cfg.finetune.init.steps == 7
    assert cfg.selection.tau == 1.0 and isinstance(cfg.selection.tau, float)  # ints are fine floats
    assert cfg.origin["selection.tau"] == "--set selection.tau"


def _walk(parser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, prefix + (name,))


def test_every_default_is_defined_once_and_agrees():
    """The dataclasses are the only source: the embedded TOML sets nothing but the family, `klas config` prints
    exactly the dataclass defaults, and no CLI flag that names a setting carries a default of its own."""
    schema = kc.sections()
    assert list(schema) == ["run", "data", *STAGES]
    printed = tomllib.loads(kc.render_toml())
    for name, cls in schema.items():
        for s in specs(cls):
            v = printed[name]
            for p in s.path:
                v = v[p]
            assert s.coerce(v, "printed") == s.default, (name, s.dotted)
    embedded = tomllib.loads(kc.DEFAULT_CONFIG.read_text())
    assert embedded == {"run": {"family": "fmnist-deit"}}
    assert kc.load_config() == kc.load_config(raw={})
    from klas.families.trainer import Recipe

    from klas.families.adapt import AdaptRecipe

    by_dest = {"__".join(("cfg", name) + s.path): s
               for name, cls in {**schema, "recipe": Recipe, "adapt": AdaptRecipe}.items()
               for s in specs(cls)}
    names = {s.path[-1] for cls in schema.values() for s in specs(cls)}
    seen = 0
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if action.dest.startswith("cfg__"):
                s = by_dest[action.dest]  # a derived flag names a setting...
                seen += 1
                assert any(o.endswith(s.flag[2:]) for o in action.option_strings), (path, s.flag)
                assert action.default is argparse.SUPPRESS, (path, s.flag)
                assert f"(default: {s.show(s.default)}" in action.help, (path, s.flag)
            elif action.dest in names and path and path[0] in ("probe", "score", "select", "finetune", "evaluate",
                                                                   "export", "run", "compare"):
                raise AssertionError(f"{path} {action.option_strings}: a hand-written flag for a setting")
    n_stage = sum(len(specs(schema[s])) for s in STAGES)
    assert seen >= n_stage  # every stage setting is a flag of its stage command (and compare's finetune flags)


# --- the cache, on fake stages ---------------------------------------------------------------------------------
def _fake_modules(calls, outputs):
    mods = []
    for name, after in (("probes", ()), ("scores", ("probes",)), ("selection", ("scores",))):
        @dataclass(frozen=True)
        class Art(Artifact):
            KIND: ClassVar[str] = name
            RECORD: ClassVar[str] = f"{name}.json"
            value: str

        def run(cfg, ctx, name=name, Art=Art):
            calls.append(name)
            art = Art(outputs.get(name, "x"))
            art.save(ctx.folder(name))
            return art

        mods.append(types.SimpleNamespace(NAME=name, CONFIG=kc.sections()[name], ARTIFACT=Art, AFTER=after,
                                          DESCRIBE=name, run=run, summary=lambda a: {"value": a.value}))
    return mods


def test_stages_skip_and_rerun_exactly(tmp_path, monkeypatch, capsys):
    calls, outputs = [], {}
    monkeypatch.setattr(pipeline, "stage_modules", lambda: _fake_modules(calls, outputs))
    base = kc.load_config(raw={})
    pipeline.run_pipeline(base, tmp_path, progress=False)
    assert calls == ["probes", "scores", "selection"]
    pipeline.run_pipeline(base, tmp_path)  # unchanged inputs: everything skipped
    assert calls == ["probes", "scores", "selection"]
    assert capsys.readouterr().out.count("up to date, skipped") == 3
    tau = kc.load_config(raw={"selection": {"tau": 0.1}})
    pipeline.run_pipeline(tau, tmp_path)  # a selection-only change re-runs selection alone
    assert calls[3:] == ["selection"]
    # threads change speed, not results: no stage re-runs
    pipeline.run_pipeline(kc.load_config(raw={"selection": {"tau": 0.1}, "run": {"threads": 1}}), tmp_path)
    assert calls[4:] == []
    # a scores change whose artifact comes out identical leaves selection up to date (keyed on the artifact)
    temp = kc.load_config(raw={"selection": {"tau": 0.1}, "scores": {"temperature": 2.0}})
    pipeline.run_pipeline(temp, tmp_path)
    assert calls[4:] == ["scores"]
    # ... and one whose artifact changes re-runs everything downstream
    outputs["scores"] = "changed"
    pipeline.run_pipeline(kc.load_config(raw={"scores": {"temperature": 3.0}}), tmp_path)
    assert calls[5:] == ["scores", "selection"]
    # an artifact rewritten behind the pipeline's back (or deleted) makes its stage and the later ones stale
    (tmp_path / "scores" / "scores.json").write_text('{"kind": "scores", "version": 1, "value": "hand-edited"}')
    cfg3 = kc.load_config(raw={"scores": {"temperature": 3.0}})
    capsys.readouterr()
    assert pipeline.run_pipeline(cfg3, tmp_path, dry_run=True) == {}
    out = capsys.readouterr().out
    assert "probes      skip" in out and "scores      re-run (its artifact changed" in out
    assert "selection   re-run (an upstream stage re-runs)" in out and calls[7:] == []
    pipeline.run_pipeline(cfg3, tmp_path)  # the re-run restores the recorded artifact: selection stays valid
    assert calls[7:] == ["scores"]


def test_dry_run_on_a_regular_file_fails_like_the_real_run(tmp_path):
    """`klas run --run-dir FILE --dry-run` exits non-zero with the real run's one line, no traceback, and leaves the
    file as it was."""
    f = tmp_path / "notadir"
    f.write_text("keep me")
    lines = []
    for extra in ((), ("--dry-run",)):
        r = subprocess.run([sys.executable, "-m", "klas", "run", "--run-dir", str(f), *extra], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-500:]
        lines.append(r.stderr.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "run directory is a file, not a directory" in lines[0]
    assert f.read_text() == "keep me"


def test_dry_run_writes_nothing_and_record_is_invalidated_first(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "stage_modules", lambda: _fake_modules(calls, {}))
    pipeline.run_pipeline(kc.load_config(raw={}), tmp_path / "run", dry_run=True)
    assert not (tmp_path / "run").exists()
    pipeline.run_pipeline(kc.load_config(raw={}), tmp_path / "run")

    def boom(cfg, ctx):
        raise RuntimeError("killed")
    mods = _fake_modules(calls, {})
    mods[1].run = boom
    monkeypatch.setattr(pipeline, "stage_modules", lambda: mods)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(kc.load_config(raw={"scores": {"temperature": 2.0}}), tmp_path / "run")
    assert not (tmp_path / "run" / "scores" / "stage.json").exists()  # an interrupted re-run is never "done"


def test_run_dir_of_another_family(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "stage_modules", lambda: _fake_modules([], {}))
    pipeline.run_pipeline(kc.load_config(raw={}), tmp_path)
    with pytest.raises(KlasError, match="belongs to family 'fmnist-deit', not 'deit'"):
        pipeline.run_pipeline(kc.load_config(raw={"run": {"family": "deit"}}), tmp_path)
    with pytest.raises(KlasError, match="--until 'nope'"):
        pipeline.run_pipeline(kc.load_config(raw={}), tmp_path, until="nope")


# --- the stale-selection scenario, end to end with the real stages ----------------------------------------------
def _klas_in(capsys, *argv) -> str:
    """``klas ARGV`` in this process (the CLI's own entry point): its stdout; it must succeed."""
    from klas.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return out


def test_single_stage_command_makes_later_stages_stale(tmp_path, capsys):
    from _stitch_helpers import tiny_vit_config

    cfg, run = tiny_vit_config(tmp_path, name="stale-vit"), tmp_path / "run"

    def _klas(*argv):
        return _klas_in(capsys, *argv)

    _klas("run", cfg, "--run-dir", run)
    sel = (run / "selection" / "selection.json").read_text()
    zoo = (run / "zoo" / "manifest.json").read_text()
    out = _klas("run", cfg, "--run-dir", run, "--dry-run")
    assert out.count("skip (up to date)") == 6
    out = _klas("select", "--run-dir", run, "--method", "mse")
    assert "method mse" in out and "probes: up to date" in out
    assert (run / "selection" / "selection.json").read_text() != sel
    out = _klas("run", cfg, "--run-dir", run, "--dry-run")
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("[")}
    assert "skip" in lines["probes"] and "skip" in lines["scores"]
    for stage in ("selection", "finetune", "evaluation", "export"):
        assert "re-run" in lines[stage], out
    # the run's own config now says mse: `klas finetune` finetunes the mse selection
    out = _klas("finetune", "--run-dir", run)
    assert "selection: up to date" in out and "finetune: done in" in out
    out = _klas("run", cfg, "--run-dir", run, "--dry-run")
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("[")}
    assert "skip" in lines["probes"] and "skip" in lines["scores"]
    for stage in ("selection", "finetune", "evaluation", "export"):
        assert "re-run" in lines[stage], out
    out = _klas("run", cfg, "--run-dir", run)
    for stage in ("selection", "finetune", "evaluation"):
        assert f"{stage}: done in" in out, out
    # the rebuilt evaluation is bit-identical to the one the zoo was exported from (same klas selection, same
    # seed), so the export is rightly up to date -- keyed on the artifact, not on the fact of a re-run
    assert "export: done in" in out or "export: up to date" in out, out
    assert '"method": "klas"' in (run / "selection" / "selection.json").read_text()
    import json
    ev = json.loads((run / "evaluation" / "evaluation.json").read_text())
    manifest = json.loads((run / "zoo" / "manifest.json").read_text())
    assert {m["name"] for m in manifest["models"]} == {z["name"] for z in ev["zoo"]} and zoo
    # the zoo ships every untouched anchor, bit for bit, and nothing else that an untouched anchor dominates on val
    untouched = {u["key"]: u for u in ev["untouched"]}
    shipped = {m["name"] for m in manifest["models"] if m.get("origin") == "untouched"}
    assert shipped == set(untouched)
    for m in manifest["models"]:
        if m.get("origin") == "untouched":
            assert m["weights"]["check"].startswith("bit-identical")
    for z in (z for z in ev["zoo"] if z["name"] not in untouched):
        cost = z["flops_avg"]["val"] if z["kind"] == "cascade" else z["flops"]
        assert not any(u["flops"] <= cost and u["val_acc"] > z["val_acc"] for u in ev["untouched"]), z["name"]
    assert _klas("run", cfg, "--run-dir", run, "--dry-run").count("skip (up to date)") == 6


def test_run_directory_is_locked_and_stale_locks_are_taken_over(tmp_path, monkeypatch, capsys):
    """A second process on a working run directory gets one line naming the holder; a lock left by a killed process
    (a holder line but no flock) is taken over with a message; a run directory that is a file is refused."""
    import os

    from klas.rundir import RunDir

    monkeypatch.setattr(pipeline, "stage_modules", lambda: _fake_modules([], {}))
    cfg = kc.load_config(raw={})
    pipeline.run_pipeline(cfg, tmp_path / "run")
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from klas.rundir import RunLock\n"
            "with RunLock(__import__('pathlib').Path(%r)):\n"
            "    print('locked', flush=True); time.sleep(60)\n") % (str(Path(__file__).parents[1]), str(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KlasError, match=rf"run directory in use by pid {holder.pid} on .*another --run-dir") as e:
            pipeline.run_pipeline(cfg, tmp_path / "run")
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    pipeline.run_pipeline(cfg, tmp_path / "run")  # the killed holder's lock is taken over
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released on a clean exit
    (tmp_path / "file").write_text("x")
    for bad, needle in ((tmp_path / "file", "is a file, not a directory"), (tmp_path / "file" / "run", "lies under")):
        with pytest.raises(KlasError, match=needle):
            RunDir(bad, "fmnist-deit")
    assert os.path.isfile(tmp_path / "file")


def test_config_toml_round_trips_awkward_strings():
    """The one TOML writer (klas.contract.toml_value) escapes what a path can hold: quotes, backslashes, unicode."""
    root = 'C:\\data\\"quoted" ünï\tcode'
    cfg = kc.load_config(raw={"data": {"root": root}, "run": {"threads": 3}})
    again = kc.load_config(raw=tomllib.loads(cfg.to_toml()))
    assert again == cfg and str(again.data.root) == root
