"""Layering rules from AGENTS.md, checked on the source."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"
WEB_ALLOWED = {APP / "deps.py", APP / "main.py"}


def _parse(source: str) -> ast.Module:
    """ast.parse with the garbage collector paused: on CPython 3.11 a finalizer that the collector runs
    while the AST's Python objects are built (left over from earlier tests in the same process) can
    break its recursion bookkeeping ("SystemError: AST constructor recursion depth mismatch", seen once
    in CI)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


MODULES = sorted(p for p in APP.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(APP)))
def test_only_the_api_layer_imports_the_web_framework(path: Path) -> None:
    if path in WEB_ALLOWED or (APP / "api") in path.parents:
        return
    web = {m for m in _imports(path) if m.split(".")[0] in ("fastapi", "starlette")}
    assert not web, f"{path.relative_to(APP)} imports {web}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(APP)))
def test_lower_layers_do_not_import_the_api(path: Path) -> None:
    # Entry points (the CLI and the `make run` demo) assemble the app, so they may import it.
    if (
        (APP / "api") in path.parents
        or path in WEB_ALLOWED
        or path in (APP / "cli.py", APP / "devkit" / "demo.py")
    ):
        return
    upward = {
        m for m in _imports(path) if m == "app.api" or m.startswith(("app.api.", "app.main", "app.deps"))
    }
    assert not upward, f"{path.relative_to(APP)} imports {upward}"
