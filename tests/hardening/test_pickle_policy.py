"""Pickle policy audit: the package never unpickles except ``torch.load(..., weights_only=True)``.

The corpus (``cases_peft.py``) shows the behaviour: ``.bin`` is refused without
``--allow-pickle`` and a malicious pickle never runs with it. This test reads the source, so
readers added later (GGUF, kohya, MLX, ...) are held to the same rule without new tests.
"""
import ast
from pathlib import Path

import adapterfmt

PACKAGE = Path(adapterfmt.__file__).resolve().parent
# Calls that unpickle (or run code) and have no safe mode.
FORBIDDEN = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"),
             ("dill", "load"), ("joblib", "load"), ("jit", "load"), ("torch", "jit")}


def dotted(node) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(PACKAGE.parent), node.lineno, dotted(node.func), node
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "marshal", "cloudpickle"} & set(names), \
                    f"{path}:{node.lineno} imports an unpickler"


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<non-constant>"
    return None


def test_torch_load_always_weights_only():
    found = 0
    for where, line, name, node in calls():
        if name[-2:] == ("torch", "load"):
            found += 1
            assert keyword(node, "weights_only") is True, f"{where}:{line} torch.load without weights_only=True"
        assert name[-2:] not in FORBIDDEN, f"{where}:{line} calls {'.'.join(name)}"
        if name[-1:] == ("load",) and name[:1] in (("np",), ("numpy",)):
            assert keyword(node, "allow_pickle") in (None, False), f"{where}:{line} np.load(allow_pickle=True)"
    assert found >= 1  # the PEFT .bin reader


def test_torch_load_is_behind_allow_pickle():
    """Every function calling torch.load checks an allow_pickle flag first."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            loads = [n for n in ast.walk(func) if isinstance(n, ast.Call) and dotted(n.func)[-2:] == ("torch", "load")]
            if loads:
                source = ast.get_source_segment(path.read_text(), func)
                assert "allow_pickle" in source, f"{path}:{func.name} calls torch.load without an allow_pickle gate"
