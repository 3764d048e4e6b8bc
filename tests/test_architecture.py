"""Facts about the package's structure (docs/architecture.md): no import cycle (module-level
and function-local imports alike), the layers below pipeline/ never import it, the package does
not call itself through the ``dj`` facade, and no block of six or more lines is repeated."""
from __future__ import annotations

import ast
import collections
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dromedary_jax")
LOWER_LAYERS = ("model", "sampling", "training", "checkpoint")
MIN_DUP_LINES = 6


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3]
                name = rel.replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (any nesting)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_walk_sees_known_edges():
    assert "dromedary_jax.pipeline.runner" in GRAPH["dromedary_jax.run"]
    assert "dromedary_jax.pipeline.records" in GRAPH["dromedary_jax.pipeline.runner"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_do_not_import_the_pipeline(layer):
    bad = {m: sorted(d for d in deps if d.startswith("dromedary_jax.pipeline"))
           for m, deps in GRAPH.items() if m.startswith(f"dromedary_jax.{layer}")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_package_does_not_call_itself_through_the_facade():
    users = sorted(m for m, deps in GRAPH.items() if "dromedary_jax" in deps and m != "dromedary_jax")
    assert users == []


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, whitespace-folded text) of the lines that carry code: blank lines,
    comments, docstring-free lone punctuation and import lines are left out (as the
    ``duplicates`` tool does)."""
    out = []
    for i, line in enumerate(open(path).read().splitlines(), 1):
        text = " ".join(line.split())
        if not text or text.startswith("#") or re.fullmatch(r"[\W_]+", text) \
                or text.startswith(("import ", "from ")):
            continue
        out.append((i, text))
    return out


def _repeated_blocks(paths: list[str], root: str) -> dict[str, list[str]]:
    """{first place: [other places]} of every run of :data:`MIN_DUP_LINES` code lines that
    stands at more than one place (places as ``file:line``)."""
    first: dict[tuple, str] = {}
    dups = collections.defaultdict(list)
    for path in paths:
        lines = _code_lines(path)
        for k in range(len(lines) - MIN_DUP_LINES + 1):
            window = tuple(t for _, t in lines[k:k + MIN_DUP_LINES])
            where = f"{os.path.relpath(path, root)}:{lines[k][0]}"
            if window in first:
                dups[first[window]].append(where)
            else:
                first[window] = where
    return dict(dups)


def test_no_block_of_six_lines_is_repeated():
    assert _repeated_blocks(sorted(MODULES.values()), ROOT) == {}


def test_the_duplicate_check_finds_a_copy(tmp_path):
    block = "\n".join(f"x{i} = compute({i}, 'a')  # step {i}" for i in range(MIN_DUP_LINES))
    (tmp_path / "a.py").write_text(block + "\n")
    (tmp_path / "b.py").write_text("import os\ny = 1\n\n" + block.replace("  ", "    ") + "\n")
    found = _repeated_blocks([str(tmp_path / "a.py"), str(tmp_path / "b.py")], str(tmp_path))
    assert found == {"a.py:1": ["b.py:4"]}
