"""Layering: no import cycle among attnzoo's modules, and no module over 400 lines outside the
kernels (small modules named for what they hold)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "attnzoo"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``mod`` imports at module level (imports inside functions are
    deferred on purpose and do not form load-time cycles; parents' ``__init__`` are implied)."""
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    deps = set()
    body = [n for top in ast.parse(path.read_text()).body
            for n in (top.body if isinstance(top, (ast.If, ast.Try)) else [top])]
    for node in body:
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                deps.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in modules and d != mod}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "attnzoo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PKG"]), "PKG", pkg)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "attnzoo.a -> attnzoo.b -> attnzoo.a" in str(e)
    else:
        raise AssertionError("a two-module cycle was not found")


def test_modules_are_small():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if "kernels" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they hold): {long}"


def test_no_private_names_imported_across_modules():
    """A name with a leading underscore is its module's business: no other attnzoo module imports
    it or reaches it through the module (``from .x import _y``, ``x._y``)."""
    mods = _modules()
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    offenders = []
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        module_aliases = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if not target.startswith("attnzoo"):
                continue
            for a in node.names:
                if private(a.name):
                    offenders.append(f"{mod}: from {target} import {a.name}")
                if f"{target}.{a.name}" in mods:
                    module_aliases.add(a.asname or a.name)
        offenders += [f"{mod}: {n.value.id}.{n.attr}" for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Attribute) and private(n.attr) and isinstance(n.value, ast.Name)
                      and n.value.id in module_aliases]
    assert not offenders, offenders
