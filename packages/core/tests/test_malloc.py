"""The worker's bound on glibc malloc arenas (celeriac.worker.malloc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from celeriac.worker.malloc import limit_malloc_arenas

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="arenas are glibc's")

PROBE = "from celeriac.worker.malloc import limit_malloc_arenas as f; import sys; print(f(int(sys.argv[1])))"


def _probe(count: int, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, str(count)], env=environ, check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


@glibc
def test_the_limit_applies_on_glibc_unless_the_user_set_malloc_arena_max() -> None:
    assert _probe(2) == "True"
    assert _probe(2, MALLOC_ARENA_MAX="4") == "False"


def test_none_or_zero_keeps_the_c_library_default() -> None:
    assert limit_malloc_arenas(None) is False
    assert limit_malloc_arenas(0) is False
