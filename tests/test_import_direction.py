"""Data flows one way between the packages, and no two modules import each other.

Every import is read from the source with `ast`, those inside functions included (a lazy import
is still an arrow: it only moves the moment the cycle bites). ministack.py, bench/ and tests/
sit on top and may import anything.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from project_sources import PACKAGES, module_name, source_files

ALLOWED: dict[str, frozenset[str]] = {
    "profiling": frozenset(),
    "model": frozenset({"profiling"}),
    "serve": frozenset({"profiling"}),
    "train": frozenset({"model", "profiling"}),
    "scaling": frozenset({"train", "model", "profiling"}),
}
# Arrows outside ALLOWED that one module takes, each with its reason: (importer, imported package) -> why.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("scaling.context", "serve"): "`scaling context` measures what a served token costs through the serving engine",
    ("scaling.cli", "serve"): "`scaling context` builds the serving engine from serve's own flags",
}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, e.g. "train.loop"
    target: str  # the imported module, resolved to a project module where it names one
    line: int


def imports_of(source: str, importer: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import in `source` (module and function level), `from a import b` resolved to the
    module a.b where that is a project module, relative imports to their absolute names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(importer, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append(Import(importer, child if child in modules else base, node.lineno))
    return sorted(dict.fromkeys(found), key=lambda i: i.line)  # `from a import b, c`: one arrow to a


def project_imports() -> list[Import]:
    files = [p for p in source_files() if module_name(p).split(".")[0] in PACKAGES]
    modules = {module_name(p) for p in files}
    return [imp for p in files for imp in imports_of(p.read_text(), module_name(p), p.name == "__init__.py", modules)]


def against_the_flow(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        source, target = imp.importer.split(".")[0], imp.target.split(".")[0]
        if (
            target in PACKAGES
            and target != source
            and target not in ALLOWED[source]
            and (imp.importer, target) not in EXCEPTIONS
        ):
            bad.append(f"{imp.importer}:{imp.line}: {source} -> {imp.target}")
    return bad


def cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), plus self-imports.
    Importing a.b.c first runs the packages a and a.b (their __init__), so those are arrows too,
    except to the importer's own packages, which are already running by the time it is."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        parts = imp.target.split(".")
        packages = [".".join(parts[:k]) for k in range(1, len(parts))]
        running = {p for p in packages if imp.importer == p or imp.importer.startswith(p + ".")}
        for target in [p for p in packages if p not in running] + [imp.target]:
            if target in modules:
                edges[imp.importer].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def test_every_import_follows_the_packages_direction():
    imports = project_imports()
    assert {(i.importer.split(".")[0], i.target.split(".")[0]) for i in imports} >= {
        ("train", "model"),
        ("model", "profiling"),
    }
    assert against_the_flow(imports) == []


def test_no_two_modules_import_each_other():
    imports = project_imports()
    assert cycles(imports, {i.importer for i in imports}) == []


def test_the_checks_see_imports_inside_functions_and_relative_ones():
    source = "from profiling import laws\n\ndef f():\n    from train.loop import train\n    from . import sibling\n"
    modules = {"profiling.laws", "train.loop", "model.sibling", "model.mine"}
    found = imports_of(source, "model.mine", False, modules)
    assert [(i.target, i.line) for i in found] == [("profiling.laws", 1), ("train.loop", 4), ("model.sibling", 5)]
    assert against_the_flow(found) == ["model.mine:4: model -> train.loop"]
    loop = [Import("model.a", "model.b", 1), Import("model.b", "model.c", 1), Import("model.c", "model.a", 1)]
    assert cycles(loop + [Import("model.d", "model.a", 1)], {"model.a", "model.b", "model.c", "model.d"}) == [
        ["model.a", "model.b", "model.c"]
    ]
    # through a package's __init__: serve.config -> serve.engine.structured runs serve.engine first,
    # whose __init__ imports the engine, which imports serve.config
    through_init = [
        Import("serve.config", "serve.engine.structured", 1),
        Import("serve.engine", "serve.engine.llm_engine", 1),
        Import("serve.engine.llm_engine", "serve.config", 1),
        Import("serve.engine.llm_engine", "serve.engine.structured", 2),  # its own package: no arrow to it
    ]
    modules = {"serve.config", "serve.engine", "serve.engine.llm_engine", "serve.engine.structured"}
    assert cycles(through_init, modules) == [["serve.config", "serve.engine", "serve.engine.llm_engine"]]


def test_every_exception_is_still_taken():
    """An exception the code no longer needs is removed, so it cannot cover a new arrow."""
    taken = {(i.importer, i.target.split(".")[0]) for i in project_imports()}
    assert set(EXCEPTIONS) <= taken
