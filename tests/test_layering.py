"""The library never imports the command line: only ``llc_onnx/cli.py`` and ``llc_onnx/__main__.py`` may."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llc_onnx"
CLI_MODULES = {"llc_onnx.cli"}
ALLOWED = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (relative imports resolved; ``from X
    import y`` counts as both ``X`` and ``X.y``), and every string passed to ``importlib.import_module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            out.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return out


def test_the_import_walker_resolves_relative_imports():
    assert "llc_onnx.cli" in _imported(PACKAGE / "__main__.py")                      # from .cli import main
    assert "llc_onnx.interpreter.graph" in _imported(PACKAGE / "interpreter" / "__init__.py")  # from .graph ...
    assert "llc_onnx.calib.gradients" in _imported(PACKAGE / "flows" / "quantize.py")        # from ..calib...


def test_no_library_module_imports_the_cli():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED:
            continue
        hits = {m for m in _imported(path) if any(m == c or m.startswith(c + ".") for c in CLI_MODULES)}
        if hits:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {', '.join(sorted(hits))}")
    assert not offenders, "library modules import the CLI:\n" + "\n".join(offenders)
    assert len(list(PACKAGE.rglob("*.py"))) > 50  # the walk really covered the package
