"""The package boundaries (README "What it is", ARCHITECTURE.md): who may import whom, and no import cycles.

    mae_ad  imports nothing of trt, agent or app
    trt     imports mae_ad only
    agent   imports mae_ad.contract and its tile geometry mae_ad.tiling only (and never torch)
    app     the wiring: may import everything; nothing imports it

Checked twice: statically, over every `import` statement of every module (including the lazy ones inside
functions, which a run would only reach on some paths), and at run time, by importing each package's modules in a
fresh interpreter and looking at `sys.modules`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mae_ad", "trt", "agent", "app")
# what each package may import of the others: exact module names, or `pkg.*` for every module of a package
ALLOWED = {
    "mae_ad": set(),
    "trt": {"mae_ad.*"},
    # `mae_ad`: the package __init__, which importing contract runs; `mae_ad.tiling`: how an image becomes the tiles
    # a tiled model's graph takes (torch-free, imports only mae_ad.contract), the same in training and the agent
    "agent": {"mae_ad", "mae_ad.contract", "mae_ad.tiling"},
    "app": {"mae_ad.*", "trt.*", "agent.*"},
}


def may_import(importer: str, module: str) -> bool:
    pkg, target = importer.split(".")[0], module.split(".")[0]
    return target == pkg or module in ALLOWED[pkg] or f"{target}.*" in ALLOWED[pkg]


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of `packages` under `root`."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """{module: the modules of `packages` it imports}, from every import statement of its source."""
    files = module_files(root, packages)

    def owner(name: str) -> str | None:  # `pkg.mod.func` -> `pkg.mod`; outside our packages -> None
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                subs = [f"{src}.{a.name}" for a in node.names]  # `from pkg import mod` imports pkg.mod
                targets = [t for t in subs if t in files]
                if len(targets) < len(subs):  # some name is an attribute of `src` itself
                    targets.append(src)
            for t in targets:
                o = owner(t)
                if o is not None and o != mod:
                    graph[mod].add(o)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import that crosses a package boundary the rules do not allow."""
    return [f"{mod} -> {t}" for mod, targets in sorted(graph.items()) for t in sorted(targets)
            if not may_import(mod, t)]


# --- the checker itself finds what it should ------------------------------------------------------------------
def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    files = {
        "mae_ad/__init__.py": "",
        "mae_ad/a.py": "from . import b\n",
        "mae_ad/b.py": "def f():\n    from .a import x  # a lazy import still closes the cycle\n",
        "mae_ad/c.py": "def g():\n    from agent.loop import Agent\n",
        "trt/__init__.py": "",
        "trt/x.py": "from mae_ad.a import thing\nimport agent.loop\n",
        "agent/__init__.py": "",
        "agent/loop.py": "from mae_ad.contract import UserError\nfrom mae_ad import b\n",
        "app/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "mae_ad" / "contract.py").write_text("")
    g = import_graph(tmp_path)
    assert g["mae_ad.a"] == {"mae_ad.b"} and g["mae_ad.b"] == {"mae_ad.a"}
    assert cycles(g) == [["mae_ad.a", "mae_ad.b"]]
    assert forbidden_edges(g) == ["agent.loop -> mae_ad.b", "mae_ad.c -> agent.loop", "trt.x -> agent.loop"]


# --- the real tree ----------------------------------------------------------------------------------------------
def test_every_package_is_found():
    files = module_files(ROOT)
    for name in ("mae_ad.contract", "mae_ad.scoring", "trt.backends", "trt.runtime", "agent.loop", "agent.backend",
                 "app.cli", "app.demo"):
        assert name in files
    assert len(files) >= 50


def test_no_import_cycles_among_our_modules():
    assert cycles(import_graph(ROOT)) == []


def test_no_upward_or_sideways_imports():
    assert forbidden_edges(import_graph(ROOT)) == []


def test_nothing_imports_the_wiring():
    graph = import_graph(ROOT)
    users = sorted(m for m, ts in graph.items() if not m.startswith("app") and any(t.startswith("app") for t in ts))
    assert users == []


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def _ours(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("package", ["agent", "trt", "mae_ad"])
def test_importing_a_package_loads_only_what_it_may(package):
    loaded = _loaded_after_import(sorted(module_files(ROOT, (package,))))
    bad = sorted(m for m in _ours(loaded) if not may_import(package, m))
    assert bad == [], f"importing every module of {package} loaded {bad}"
    if package == "agent":
        heavy = sorted(m for m in ("torch", "timm", "loralib", "tensorrt", "trt") if m in loaded)
        assert heavy == [], f"import agent loaded {heavy}"
