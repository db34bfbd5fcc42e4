"""The import graph of ``apimeta``: acyclic, arrows pointing down the layers of
docs/architecture.md, no library module importing the CLI, the HTTP client free of the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import apimeta

ROOT = Path(apimeta.__file__).parent

#: layer of each module (longest matching prefix); arrows may only point to the same or a
#: lower layer. 0 core, 1 apis/models/data, 2 pipeline stages, 3 methods, 4 runner, 5 CLI.
LAYERS = {
    "apimeta": 0,
    "apimeta.errors": 0,
    "apimeta.registry": 0,
    "apimeta.seeding": 0,
    "apimeta.io": 0,
    "apimeta.config": 0,
    "apimeta.run_config": 0,
    "apimeta.episodes": 0,
    "apimeta.checkpoint": 0,
    "apimeta.transforms": 0,
    "apimeta.runs": 0,
    "apimeta.report": 0,
    "apimeta.stats": 0,
    "apimeta.parallel": 0,
    "apimeta.apis": 1,
    "apimeta.models": 1,
    "apimeta.data": 1,
    "apimeta.zo": 2,
    "apimeta.losses": 2,
    "apimeta.maml": 2,
    "apimeta.scenarios": 2,
    "apimeta.recovery": 2,
    "apimeta.candidates": 2,
    "apimeta.bilevel": 2,
    "apimeta.memory": 2,
    "apimeta.interpolation": 2,
    "apimeta.events": 2,
    "apimeta.evaluate": 2,
    "apimeta.methods": 3,
    "apimeta.runner": 4,
    "apimeta.bench": 4,
    "apimeta.testing": 4,
    "apimeta.cli": 5,
}


def module_name(path: Path) -> str:
    parts = ["apimeta", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(mod: str) -> set[str]:
    """apimeta modules ``mod`` imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[mod].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("apimeta")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apimeta"):
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m != mod}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer_and_every_import_exists():
    for mod, deps in GRAPH.items():
        layer(mod)
        assert deps <= set(MODULES), (mod, deps - set(MODULES))


def test_imports_point_down_the_layers():
    bad = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if layer(d) > layer(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_cli_or_prints():
    for mod, path in MODULES.items():
        if mod.startswith("apimeta.cli"):
            continue
        assert not any(d.startswith("apimeta.cli") for d in GRAPH[mod]), mod
        calls = [
            n
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
        ]
        assert not calls, f"{mod} calls print(); use logging or a progress callback"


def test_http_client_needs_no_web_framework_and_no_server():
    assert "apimeta.apis.server" not in GRAPH["apimeta.apis.http"]
    code = (
        "import sys, apimeta.apis.http, apimeta.methods\n"
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'apimeta.apis.server') "
        "if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registries_are_filled_by_explicit_imports():
    """Every method/dataset/CLI module is imported by name in its package (none dropped)."""
    from apimeta.data import DATASETS
    from apimeta.methods import METHODS

    assert {"bidf-mkd", "bbkd", "maml-real", "random"} <= set(METHODS.names())
    assert {"emoji", "kanji", "cifar-fs", "mini-imagenet", "cub", "folder", "synthetic"} <= set(
        DATASETS.names()
    )
    for pkg in ("methods", "data", "cli"):
        init = (ROOT / pkg / "__init__.py").read_text()
        assert "importlib" not in init and "for _mod in" not in init, pkg
