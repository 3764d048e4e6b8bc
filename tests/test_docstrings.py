"""Every public definition of the dromedary_jax package has a docstring.

The files are read with `ast`, so the check imports nothing (no jax, no model code). A public
definition is: each module itself (its module docstring, `__init__.py` and `__main__.py`
included); each module-level function or class whose name does not start with "_"; each method
(properties included) of such a class whose name does not start with "_" (dunders and `__init__`
are skipped). Property setters/deleters and `typing.overload` stubs are skipped: the docstring
belongs on the getter or the implementation. One test case per file, so a failure names the file,
and its message lists "path:line name" for each definition without a docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dromedary_jax"


def _package_files() -> list[Path]:
    """The package's .py files, sorted, relative to the repository root."""
    return sorted(
        p.relative_to(REPO) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts
    )


def _is_public(name: str) -> bool:
    """True for a name that does not start with an underscore."""
    return not name.startswith("_")


def _decorator_name(node: ast.expr) -> str:
    """The dotted text of a decorator (`a.b` for `@a.b(...)`), or "" when it is something else."""
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _needs_docstring(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """False for property setters / deleters and `@overload` stubs (they share a name whose
    docstring is on the getter or the implementation)."""
    for dec in func.decorator_list:
        name = _decorator_name(dec)
        if name.endswith((".setter", ".deleter")) or name in ("overload", "typing.overload"):
            return False
    return True


def missing_docstrings(path: Path) -> list[str]:
    """`path:line name` of each public definition in `path` (relative to the repository root)
    that has no docstring; `<module>` at line 1 for a missing module docstring."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=str(path))
    missing = []
    if ast.get_docstring(tree) is None:
        missing.append(f"{path}:1 <module>")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _is_public(node.name) and _needs_docstring(node) and ast.get_docstring(node) is None:
                missing.append(f"{path}:{node.lineno} {node.name}")
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            if ast.get_docstring(node) is None:
                missing.append(f"{path}:{node.lineno} {node.name}")
            for item in node.body:
                if (
                    isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and _is_public(item.name)
                    and _needs_docstring(item)
                    and ast.get_docstring(item) is None
                ):
                    missing.append(f"{path}:{item.lineno} {node.name}.{item.name}")
    return missing


def test_package_files_found():
    """The walk sees the package (a wrong root would make every per-file case vacuous)."""
    files = {str(p) for p in _package_files()}
    assert "dromedary_jax/__init__.py" in files
    assert "dromedary_jax/model/llama.py" in files


@pytest.mark.parametrize("path", _package_files(), ids=str)
def test_public_definitions_have_docstrings(path: Path):
    """Each public definition in `path` has a docstring."""
    missing = missing_docstrings(path)
    assert not missing, f"{len(missing)} public definition(s) without a docstring:\n" + "\n".join(
        missing
    )
