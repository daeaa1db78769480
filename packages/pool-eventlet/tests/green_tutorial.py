"""Runs the repository's ``examples/tutorial.py`` with its worker on a green pool.

``python green_tutorial.py POOL`` behaves as ``python examples/tutorial.py`` (same environment
variables, same exit code) except that the worker it starts gets ``-P POOL`` instead of
``-P threads``. Only the worker is patched: this client process is not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


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


def main(pool: str) -> int:
    """Run the tutorial with ``-P pool``; return its exit code."""
    sys.path.insert(0, str(EXAMPLES))
    import tutorial

    tutorial.subprocess = _PoolSubprocess(pool)  # type: ignore[assignment]
    print(f"(the worker runs with -P {pool})", flush=True)
    return int(tutorial.main())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
