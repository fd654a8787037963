"""Layers point one way: models <- loaders <- pipelines <- (compile, bench, batch, serve, CLI); schedulers and utils
depend on neither models nor pipelines; nothing below them imports the package root. Read from the source (every import
statement, those inside functions too), so that an import run only when a method is called counts as well."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rapiddiff

PACKAGE = Path(rapiddiff.__file__).parent
ABOVE = ("pipelines", "compile", "bench", "batch", "serve", "cli", "cli_generate", "__main__")
# What each layer may not import: the layers above it.
FORBIDDEN = {
    "utils": ("models", "schedulers", "loaders", *ABOVE),
    "models": ("loaders", *ABOVE),
    "schedulers": ("models", "loaders", *ABOVE),
    "loaders": ABOVE,
    "pipelines": ABOVE[1:],
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; `rapiddiff` alone is the package root."""
    package = ".".join(("rapiddiff", *path.parent.relative_to(PACKAGE).parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from .. import x` imports x from the package: name it as the module it may be
            names = [f"{module}.{alias.name}" for alias in node.names] if not node.module else [module]
            found += [(node.lineno, name) for name in names]
    return found


def is_package_root(parts: list[str]) -> bool:
    """`import rapiddiff`, or a name imported from the package itself (not one of its modules)."""
    return len(parts) == 1 or not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file())


def upward_imports(layer: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "rapiddiff":
                continue
            if is_package_root(parts) or parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_nothing_above_them(layer):
    assert upward_imports(layer) == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The scan itself: a function-level import of a loader from a model, and `from .. import x`, are found."""
    fake = tmp_path / "rapiddiff"
    (fake / "models").mkdir(parents=True)
    (fake / "loaders").mkdir()
    (fake / "models" / "m.py").write_text(
        "def f():\n    from ..loaders.lora import x\n    from .. import DiffusionPipeline\n    return x\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert upward_imports("models") == [
        "models/m.py:2 imports rapiddiff.loaders.lora",
        "models/m.py:3 imports rapiddiff.DiffusionPipeline",
    ]
