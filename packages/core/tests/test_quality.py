"""The core stays ruff-clean and mypy-clean (strict), so the test command checks both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed in this environment")
    return found


def test_ruff_is_clean_on_core() -> None:
    out = subprocess.run([_tool("ruff"), "check", str(CORE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean_on_core() -> None:
    out = subprocess.run([_tool("mypy"), "--config-file", str(CORE / "pyproject.toml"),
                          str(CORE / "src" / "celeriac")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
