"""Runs the repository's ``examples/tutorial.py`` with its worker on a green pool.

``python -m celeriac.testing.green_tutorial POOL EXAMPLES_DIR`` behaves as
``python EXAMPLES_DIR/tutorial.py`` (same environment variables, same exit code) except that the
worker it starts gets ``-P POOL`` instead of ``-P threads``. Only the worker is patched: this
client process is not. The green pool kit (:mod:`celeriac.testing.green_kit`) runs it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


class _PoolSubprocess:
    """Stands in for the ``subprocess`` module inside the tutorial: same API, but the worker
    command line names the green pool."""

    def __init__(self, pool: str) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:  # noqa: N802
        """``subprocess.Popen`` with the argument after ``-P`` replaced by the green pool."""
        cmd = list(cmd)
        if "-P" in cmd:
            cmd[cmd.index("-P") + 1] = self.pool
        else:
            cmd += ["-P", self.pool]
        return subprocess.Popen(cmd, **kwargs)


def main(pool: str, examples: Path) -> int:
    """Run ``examples/tutorial.py``'s ``main()`` with ``-P pool``; return its exit code (int).

    ``examples`` is the folder holding ``tutorial.py`` and its ``proj`` package. Raises
    ``ImportError`` when ``tutorial.py`` is not there.
    """
    sys.path.insert(0, str(examples))
    tutorial: Any = importlib.import_module("tutorial")
    tutorial.subprocess = _PoolSubprocess(pool)
    print(f"(the worker runs with -P {pool})", flush=True)
    return int(tutorial.main())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
