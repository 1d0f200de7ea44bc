"""No function or method over MAX_LINES lines, outside tests/: a longer one does several things,
and each should have a name. The few allowed longer say why."""

from __future__ import annotations

import ast
from pathlib import Path

from project_sources import ROOT, source_files

MAX_LINES = 80
# "path:qualified name" -> why it may be longer, for now (none today)
ALLOWED: dict[str, str] = {}


def function_lengths(source: str) -> dict[str, int]:
    """Every function and method of `source` by qualified name ('Class.method', 'outer.inner'):
    its lines from `def` to its last statement, docstring and nested functions included."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def project_lengths() -> dict[str, int]:
    return {
        f"{path.relative_to(ROOT).as_posix()}:{name}": n
        for path in source_files(skip=("tests",))
        for name, n in function_lengths(Path(path).read_text()).items()
    }


def test_no_function_is_longer_than_the_limit():
    too_long = {name: n for name, n in project_lengths().items() if n > MAX_LINES and name not in ALLOWED}
    assert too_long == {}, f"split these (at most {MAX_LINES} lines each): {too_long}"


def test_every_allowed_function_is_still_long():
    """An entry whose function was split (or removed) goes, so the list only shrinks."""
    lengths = project_lengths()
    stale = [name for name in ALLOWED if lengths.get(name, 0) <= MAX_LINES]
    assert stale == [], f"no longer over {MAX_LINES} lines: remove from ALLOWED: {stale}"


def test_lengths_are_counted_per_function_and_method():
    source = "class A:\n    def m(self):\n        def inner():\n            pass\n        return 1\n\n\nasync def f():\n    x = 1\n    return x\n"
    assert function_lengths(source) == {"A.m": 4, "A.m.inner": 2, "f": 3}
