"""The package's layers import only downward, and no module of ours sits in an import cycle."""
from __future__ import annotations

import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contract_is_kept(monkeypatch, capsys):
    # The contract lives in pyproject.toml ([tool.importlinter]); it has no exceptions list.
    from importlinter.cli import lint_imports
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, capsys.readouterr().out[-3000:]
    assert "1 kept, 0 broken" in capsys.readouterr().out


def module_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    modules = sorted(graph.modules)
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.find_modules_directly_imported_by(node)):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for module in modules:
        if module not in index:
            visit(module)
    return out


def test_no_module_is_in_an_import_cycle():
    graph = grimp.build_graph("adapterfmt")
    # A package's __init__ re-exporting its submodules is not a cycle between modules of ours.
    for module in list(graph.modules):
        for child in graph.find_children(module):
            if graph.direct_import_exists(importer=module, imported=child):
                graph.remove_import(importer=module, imported=child)
            if graph.direct_import_exists(importer=child, imported=module):
                graph.remove_import(importer=child, imported=module)
    assert module_cycles(graph) == []
