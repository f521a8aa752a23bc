"""The import graph of ``tallskinny``: acyclic, in layers, no private names across modules.

Every module of ``tallskinny``, of the plugins and of the tests is parsed with ``ast``;
every ``import`` counts, at module level and inside functions. The layers, each importing
only from itself and those before it (``docs/architecture.md``):

    0  linalg                                  dense and structured linear algebra
    1  errors, vectors, collector              leaf utilities (errors needs linalg.errors)
    2  blocks                                  the oracles of one block
    3  elimination | routes                    the engine and the routes beside it: siblings,
                                               neither imports the other
    4  resources, curvature, chain, batches,   a chain's curvature; resources sizes the
       testing                                 engine's work, testing reaches into it
    5  tallskinny (the package's __init__)     the public facade
    6  optim, trust_region, influence,         methods built on a curvature
       laplace, per_example
    7  cli

Plugins import only the public API: ``tallskinny`` (names in its ``__all__``),
``tallskinny.testing`` and the ``tallskinny.blocks`` and ``tallskinny.linalg`` packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tallskinny"

LAYERS: dict[str, int] = {
    "linalg": 0,
    "errors": 1, "vectors": 1, "collector": 1, "distributed": 1,
    "blocks": 2,
    "elimination": 3, "routes": 3, "spectrum": 3,
    "resources": 4, "curvature": 4, "chain": 4, "batches": 4, "testing": 4,
    "": 5,  # tallskinny/__init__.py
    "optim": 6, "trust_region": 6, "influence": 6, "laplace": 6, "per_example": 6,
    "cli": 7,
}  # fmt: skip
SIBLINGS = {frozenset(("elimination", "routes"))}
PLUGIN_API_MODULES = ("tallskinny.testing",)
PLUGIN_API_PACKAGES = ("tallskinny.blocks", "tallskinny.linalg")


# -- reading the sources ----------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, tuple[Path, bool]]:
    """``{module: (path, is_package)}`` of the package and the plugins' packages."""
    out = {}
    roots = [ROOT] + [p for p in (ROOT / "plugins").iterdir() if p.is_dir()]
    for root in roots:
        for path in root.glob("tallskinny*/**/*.py"):
            out[module_name(path, root)] = (path, path.name == "__init__.py")
    return out


def imports(path: Path, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """``(module, name or None, line)`` of every import in ``path``, anywhere in the file;
    relative imports resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            out += [(base, a.name, node.lineno) for a in node.names]
    return out


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within ``modules``. ``from p import x`` is an edge
    to ``p.x`` where that is a module, else to ``p``."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        for target, name, _ in imports(path, module, is_package):
            if name is not None and f"{target}.{name}" in modules:
                target = f"{target}.{name}"
            if target in modules and target != module:
                graph[module].add(target)
    return graph


# -- the rules ----------------------------------------------------------------------------------
def layer_of(module: str) -> tuple[str, int]:
    """The top-level part of ``tallskinny.<part>…`` and its layer."""
    part = module.split(".")[1] if "." in module else ""
    if part not in LAYERS:
        raise KeyError(f"{module}: no layer for {part!r}; add it to LAYERS and docs/architecture.md")
    return part, LAYERS[part]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a, targets in graph.items():
        if not a.startswith(PACKAGE + ".") and a != PACKAGE:
            continue
        part_a, layer_a = layer_of(a)
        for b in sorted(targets):
            if not b.startswith(PACKAGE + ".") and b != PACKAGE:
                continue
            part_b, layer_b = layer_of(b)
            if layer_b > layer_a:
                out.append(f"{a} (layer {layer_a}) imports {b} (layer {layer_b})")
            elif part_a != part_b and frozenset((part_a, part_b)) in SIBLINGS:
                out.append(f"{a} imports its sibling {b}")
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(found: list[tuple[str, str, str | None, int]], project: set[str]) -> list[str]:
    """Imports of a ``_name`` (or from a ``_module``) of another project module."""
    out = []
    for where, target, name, line in found:
        if target.split(".")[0] not in project or target == "__future__":
            continue
        dotted = target.split(".") + ([name] if name else [])
        if any(is_private(part) for part in dotted):
            out.append(f"{where}:{line} imports {'.'.join(dotted)}")
    return out


def plugin_violations(found: list[tuple[str, str, str | None, int]], public_names: set[str]) -> list[str]:
    out = []
    for where, target, name, line in found:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        if target == PACKAGE:
            ok = name is None or name in public_names or f"{PACKAGE}.{name}" in PLUGIN_API_MODULES + PLUGIN_API_PACKAGES
        else:
            ok = target in PLUGIN_API_MODULES or any(target == p or target.startswith(p + ".") for p in PLUGIN_API_PACKAGES)
        if not ok:
            out.append(f"{where}:{line} imports {target}{'.' + name if name else ''} (not public)")
    return out


def all_imports() -> list[tuple[str, str, str | None, int]]:
    """``(file, module, name, line)`` of every import in the package, plugins and tests."""
    files = list((ROOT / PACKAGE).rglob("*.py")) + list((ROOT / "plugins").rglob("*.py")) + list((ROOT / "tests").rglob("*.py"))
    modules = sources()
    by_path = {path: (m, pkg) for m, (path, pkg) in modules.items()}
    out = []
    for path in files:
        module, is_package = by_path.get(path, (path.stem, False))
        rel = str(path.relative_to(ROOT))
        out += [(rel, t, n, line) for t, n, line in imports(path, module, is_package)]
    return out


def project_names() -> set[str]:
    test_modules = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {p.stem for p in (ROOT / "plugins").rglob("tests/*.py")}
    return {PACKAGE, "tallskinny_conv", "tallskinny_residual"} | test_modules


def shared_test_module_names(paths: list[Path]) -> dict[str, list[str]]:
    """Test modules whose file names collide. The test directories are not packages, so pytest
    imports each ``test_*.py`` under its bare file name: a second one of the same name stops the
    collection of the whole suite."""
    by_name: dict[str, list[str]] = {}
    for path in paths:
        by_name.setdefault(path.name, []).append(str(path))
    return {name: sorted(found) for name, found in by_name.items() if len(found) > 1}


def collected_test_files() -> list[Path]:
    return [p.relative_to(ROOT) for p in list((ROOT / "tests").rglob("test_*.py")) + list((ROOT / "plugins").rglob("tests/**/test_*.py"))]


# -- the tests ------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    for module in sources():
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            layer_of(module)


def test_the_import_graph_is_acyclic():
    assert cycles(import_graph(sources())) == []


def test_modules_import_only_from_their_layer_and_those_before():
    assert layer_violations(import_graph(sources())) == []


def test_no_private_names_cross_modules():
    assert private_imports(all_imports(), project_names()) == []


def test_plugins_import_only_the_public_api():
    import tallskinny

    plugin_files = [f for f in all_imports() if f[0].startswith("plugins/")]
    assert plugin_files
    assert plugin_violations(plugin_files, set(tallskinny.__all__)) == []


def test_test_modules_have_distinct_file_names():
    files = collected_test_files()
    assert len(files) > 50 and any(f.parts[0] == "plugins" for f in files)
    assert shared_test_module_names(files) == {}


def test_the_checks_catch_a_bad_graph():
    """The rules fail where they should: a cycle, an import upwards, one between the
    siblings, a private name, an internal module in a plugin, two test files of one name."""
    graph = {
        "tallskinny.linalg.a": {"tallskinny.linalg.b"},
        "tallskinny.linalg.b": {"tallskinny.linalg.a"},  # a cycle
        "tallskinny.blocks.x": {"tallskinny.curvature"},  # upwards
        "tallskinny.elimination.y": {"tallskinny.routes.z"},  # siblings
        "tallskinny.curvature": set(),
        "tallskinny.routes.z": set(),
    }
    assert cycles(graph) == [["tallskinny.linalg.a", "tallskinny.linalg.b"]]
    bad = layer_violations(graph)
    assert len(bad) == 2 and "layer 2" in bad[0] and "sibling" in bad[1]
    found = [("t.py", "tallskinny.elimination.algebra", "_symmetrize", 1), ("t.py", "tallskinny._gc", None, 2),
             ("t.py", "torch._C", None, 3), ("t.py", "tallskinny", "__version__", 4)]
    assert len(private_imports(found, {PACKAGE})) == 2
    found = [("p.py", "tallskinny", "elimination", 1), ("p.py", "tallskinny.elimination.stages", "Stage", 2),
             ("p.py", "tallskinny.blocks.linear", "LinearBlock", 3), ("p.py", "tallskinny", "Chain", 4)]
    assert len(plugin_violations(found, {"Chain"})) == 2
    with pytest.raises(KeyError):
        layer_of("tallskinny.unplaced")
    same = [Path("tests/test_testing.py"), Path("tests/blocks/test_testing.py"), Path("tests/blocks/test_func.py")]
    assert shared_test_module_names(same) == {"test_testing.py": ["tests/blocks/test_testing.py", "tests/test_testing.py"]}
