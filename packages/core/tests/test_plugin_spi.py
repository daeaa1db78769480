"""The plugin interface version: a plugin whose ``celeriac`` range excludes this celeriac is
refused, before it is imported, with one line naming both versions."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import celeriac
from celeriac.exceptions import PluginNotFound
from celeriac.plugins import SPI_VERSION, create_broker, manager


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution on sys.path: ``celeriac-spi-fake`` 2.0, built for celeriac>=99.0,<100, whose
    entry-point module does not exist (importing it would fail with another error)."""
    info = tmp_path / "celeriac_spi_fake-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: celeriac-spi-fake\nVersion: 2.0\n"
                                   "Requires-Dist: celeriac>=99.0,<100\nRequires-Dist: kombu>=5\n")
    (info / "entry_points.txt").write_text("[celeriac]\nspifake = celeriac_spi_fake_missing.plugin\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    manager.reset()
    yield tmp_path
    monkeypatch.undo()
    manager.reset()


def test_spi_version_is_exposed() -> None:
    assert isinstance(SPI_VERSION, int) and SPI_VERSION >= 1


def test_a_plugin_for_another_interface_is_refused_in_one_line(fake_plugin: Path) -> None:
    infos = {info.name: info for info in manager.plugin_infos()}
    error = infos["spifake"].error
    assert error is not None and "\n" not in error
    assert "celeriac-spi-fake 2.0 needs celeriac>=99.0,<100" in error
    assert f"this is celeriac {celeriac.__version__} (plugin interface {SPI_VERSION})" in error
    assert "ModuleNotFoundError" not in error  # refused before importing
    with pytest.raises(PluginNotFound, match="celeriac-spi-fake 2.0 needs celeriac>=99.0,<100"):
        create_broker("spifake://", {})


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("0.1.0", ">=0.1,<0.2", True), ("0.2.0", ">=0.1,<0.2", False), ("0.1.9", "<0.2", True),
    ("0.1.5", "==0.1.*", True), ("0.2.0", "==0.1.*", False), ("0.1.3", "~=0.1.0", True),
    ("0.2.0", "~=0.1.0", False), ("0.1.0", "!=0.1.0", False), ("1.0", ">0.9", True),
])
def test_version_ranges(version: str, spec: str, ok: bool) -> None:
    assert manager._satisfies(version, spec) is ok


def test_requirements_that_are_not_celeriac_are_ignored() -> None:
    assert manager.spi_mismatch("x", "1", ["celeriac-redis>=9", 'celeriac>=99; extra == "test"',
                                           "celeriac>=0.1,<0.2", "celeriac"]) is None
