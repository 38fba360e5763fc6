"""The layout issue 25 promises, checked on the source tree: file sizes, which package may import which (walked
with ``ast``: module- and function-level imports, ``import x`` and ``from x import y``, relative imports resolved,
``importlib.import_module("...")`` with a literal name), a torch-free runtime, no import cycle in the runtime, and a
README that is a landing page.

Each check has a helper that returns the offending items, so a failure names them; the helpers are themselves
tested on small generated trees (a check that cannot fail proves nothing).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SRC = REPO / "runtime"  # the folder holding the klas_runtime package
MAX_LINES = 600
README_MAX_LINES = 250
TORCH = ("torch", "torchvision", "torchaudio", "timm")  # torch, and packages that import it


# --- helpers -------------------------------------------------------------------------------------------------------

def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path, source_root: Path) -> str:
    """``klas/stages/s2_scores.py`` under REPO -> ``klas.stages.s2_scores``; a package's ``__init__.py`` -> the
    package."""
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the file (module level, inside functions and
    classes, under ``if``/``try``). ``from x import y`` yields ``x`` and ``x.y`` (``y`` may be a submodule:
    ``from klas import research`` imports ``klas.research``); relative imports are resolved against ``module``;
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin:
                found.append((node.lineno, origin))
            found += [(node.lineno, f"{origin}.{a.name}" if origin else a.name) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return sorted(set(found))


def long_files(folders: list[Path], limit: int = MAX_LINES, root: Path = REPO) -> list[str]:
    """'path: N lines' for every .py file under ``folders`` longer than ``limit`` lines."""
    out = []
    for folder in folders:
        for p in python_files(folder):
            n = len(p.read_text(encoding="utf-8").splitlines())
            if n > limit:
                out.append(f"{p.relative_to(root)}: {n} lines")
    return out


def forbidden_imports(folder: Path, source_root: Path, forbidden: tuple[str, ...],
                      root: Path = REPO) -> list[str]:
    """'path:line imports NAME' for every import, in any .py file under ``folder``, of a module that is or lies
    under one of ``forbidden`` (dotted names); one item per import line (its shortest such name)."""
    out = []
    for p in python_files(folder):
        hits: dict[int, str] = {}
        for line, name in imports_of(p, module_name(p, source_root)):
            if any(is_under(name, f) for f in forbidden) and (line not in hits or len(name) < len(hits[line])):
                hits[line] = name
        out += [f"{p.relative_to(root)}:{line} imports {name}" for line, name in sorted(hits.items())]
    return out


def import_graph(folder: Path, source_root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (anywhere in its file, function level included)."""
    files = {module_name(p, source_root): p for p in python_files(folder)}
    return {m: {name for _, name in imports_of(p, m) if name in files and name != m} for m, p in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:  # a path from the group's first module back to it, inside the group
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def modules_pulling_torch(modules: list[str], sys_path: Path) -> list[str]:
    """Import ``modules`` one after another in a fresh interpreter (``sys_path`` first on its path); the modules
    after whose import a torch package had appeared in ``sys.modules``, and any that failed to import."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(sys_path)!r})\n"
        f"heavy = {TORCH!r}\n"
        "out = []\n"
        "for m in json.loads(sys.argv[1]):\n"
        "    before = {h for h in heavy if h in sys.modules}\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        out.append(f'{m} (failed to import: {type(e).__name__}: {e})')\n"
        "        continue\n"
        "    new = sorted(h for h in heavy if h in sys.modules and h not in before)\n"
        "    if new:\n"
        "        out.append(f\"{m} (brought in {', '.join(new)})\")\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(modules)], capture_output=True, text=True,
                       cwd=sys_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def long_text(path: Path, limit: int) -> list[str]:
    n = len(path.read_text(encoding="utf-8").splitlines())
    return [f"{path.relative_to(REPO)}: {n} lines (at most {limit})"] if n > limit else []


def runtime_modules() -> list[str]:
    """Every klas_runtime module but ``__main__`` (importing it runs the command line)."""
    return [module_name(p, RUNTIME_SRC) for p in python_files(RUNTIME_SRC / "klas_runtime")
            if p.name != "__main__.py"]


# --- the checks ----------------------------------------------------------------------------------------------------

def test_no_source_file_over_600_lines():
    bad = long_files([REPO / "klas", REPO / "runtime"])
    assert not bad, f"files over {MAX_LINES} lines (split them by role): {'; '.join(bad)}"


def test_stages_never_import_research():
    bad = forbidden_imports(REPO / "klas" / "stages", REPO, ("klas.research",))
    assert not bad, ("klas/stages must not import klas.research (baselines and methods register themselves): "
                     + "; ".join(bad))


def test_runtime_source_never_imports_torch():
    bad = forbidden_imports(RUNTIME_SRC / "klas_runtime", RUNTIME_SRC, TORCH)
    assert not bad, "klas_runtime must stay torch-free (deployment hosts lack it): " + "; ".join(bad)


def test_importing_every_runtime_module_leaves_torch_out():
    modules = runtime_modules()
    assert "klas_runtime.runtime" in modules and "klas_runtime.profile" in modules
    bad = modules_pulling_torch(modules, RUNTIME_SRC)
    assert not bad, "importing klas_runtime brought torch into sys.modules: " + "; ".join(bad)


def test_no_import_cycle_in_the_runtime():
    cycles = import_cycles(import_graph(RUNTIME_SRC / "klas_runtime", RUNTIME_SRC))
    assert not cycles, "klas_runtime modules import each other: " + "; ".join(" -> ".join(c) for c in cycles)


def test_readme_is_a_landing_page():
    bad = long_text(REPO / "README.md", README_MAX_LINES)
    assert not bad, "the README is a landing page; move reference material to docs/: " + "; ".join(bad)


# --- the helpers can fail ------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """A small fake source tree: pkg/stages importing pkg.research four ways, a runtime-like package with a
    function-level torch import and a cycle closed by a lazy relative import."""
    files = {
        "pkg/__init__.py": "",
        "pkg/research/__init__.py": "",
        "pkg/research/study.py": "X = 1\n",
        "pkg/stages/__init__.py": "",
        "pkg/stages/clean.py": "import json\nfrom pkg import stagesx\nfrom ..researcher import y\n",
        "pkg/stages/a.py": "from pkg.research.study import X\n",
        "pkg/stages/b.py": "def f():\n    from ..research import study\n    return study\n",
        "pkg/stages/c.py": "from pkg import research\n",
        "pkg/stages/d.py": "import importlib\nM = importlib.import_module('pkg.research.study')\n",
        "rt/__init__.py": "",
        "rt/one.py": "from rt.two import g\n\ndef f():\n    return g()\n",
        "rt/two.py": "def g():\n    from . import one\n    import torch.nn\n    return one\n",
        "rt/three.py": "from rt import one\n",
        "long.py": "x = 1\n" * (MAX_LINES + 1),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_import_walk_finds_every_form(tree):
    bad = forbidden_imports(tree / "pkg" / "stages", tree, ("pkg.research",), root=tree)
    assert bad == ["pkg/stages/a.py:1 imports pkg.research.study",
                   "pkg/stages/b.py:2 imports pkg.research",  # relative, inside a function: resolved
                   "pkg/stages/c.py:1 imports pkg.research",  # the package named as an imported name
                   "pkg/stages/d.py:2 imports pkg.research.study"], bad  # importlib with a literal name


def test_cycle_and_torch_and_size_checks_fail_on_offenders(tree):
    cycles = import_cycles(import_graph(tree / "rt", tree))
    assert cycles == [["rt.one", "rt.two", "rt.one"]], cycles
    assert forbidden_imports(tree / "rt", tree, TORCH, root=tree) == ["rt/two.py:3 imports torch.nn"]
    assert long_files([tree], root=tree) == [f"long.py: {MAX_LINES + 1} lines"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_subprocess_check_names_the_module_that_pulls_torch(tmp_path):
    (tmp_path / "heavy_mod.py").write_text("import torch\n")
    (tmp_path / "light_mod.py").write_text("import json\n")
    bad = modules_pulling_torch(["light_mod", "heavy_mod"], tmp_path)
    assert bad == ["heavy_mod (brought in torch)"], bad
