"""The import direction the README's architecture section states, checked on the source:
clients → (HTTP) → server → models → kernels, and inside server/ the HTTP front-end on top
of the core. A module that reaches "up" fails here with its name and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "denoised.kernels", "models": "denoised.models", "server": "denoised.server"}
# What each part may not import (prefixes of dotted module names).
FORBIDDEN = {
    "kernels": ("denoised.models", "denoised.server", "denoised_client"),
    "models": ("denoised.server", "denoised_client"),
    "server": ("denoised_client",),
}
SERVER_CORE = ("admission.py", "registry.py", "lifecycle.py", "settings.py")  # + engine/


def _module(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    return ".".join((PACKAGES[folder], *rest)).removesuffix(".__init__")


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    names = []
    package = _module(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
    return names


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_layout_has_modules_to_check() -> None:
    assert all(len(_sources(folder)) > 3 for folder in PACKAGES)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_one_way(folder: str) -> None:
    upward = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(folder)
        for name in _imports(path)
        if name.startswith(FORBIDDEN[folder])
    ]
    assert not upward, upward


def test_the_server_core_knows_nothing_of_http() -> None:
    core = [ROOT / "server" / name for name in SERVER_CORE if name.endswith(".py")]
    core += _sources("server/engine")
    upward = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in core
        for name in _imports(path)
        if name.startswith(("denoised.server.http", "fastapi", "starlette", "pydantic"))
    ]
    assert not upward, upward
