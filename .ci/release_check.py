"""Install every package from its built wheel, in fresh venvs, and check it works on its own.

Run by ``nox -s release_check`` after ``nox -s build`` (wheels and sdists in ``dist/``)::

    python .ci/release_check.py [--dist dist] [--skip-tutorial]

Checks, each in a new venv (``python -m venv --without-pip``, driven by this interpreter's pip
with ``--python``):

1. the core alone: ``celeriac plugins`` lists only the built-ins, and ``examples/tutorial.py``
   runs on the embedded SQLite broker;
2. the core plus each plugin in turn: ``celeriac plugins`` lists the plugin (loaded, no error),
   its entry-point modules import, and its ``celeriac`` requirement is a range (``>=X,<Y``) that
   admits the built core.

Our packages are installed from the wheel files themselves (so nothing of ours can come from an
index or the work tree); their third-party dependencies come from the package index, through pip's
caches. Every package in ``packages/*/pyproject.toml`` must have a wheel and an sdist in ``dist/``.
Exit code 0 when every check passed; each check prints one line.
"""

from __future__ import annotations

import argparse
import configparser
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = "celeriac"
BUILTIN = "builtin"


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Package:
    """One package of the monorepo and its built files."""

    name: str
    version: str
    folder: Path
    wheel: Path | None = None
    sdist: Path | None = None
    entry_points: dict[str, str] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)

    def read_wheel(self) -> None:
        """Entry points of group ``celeriac`` and ``Requires-Dist`` from the wheel's metadata."""
        assert self.wheel is not None
        with zipfile.ZipFile(self.wheel) as whl:
            names = whl.namelist()
            meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
            message = email.parser.Parser().parsestr(whl.read(meta).decode())
            self.requires = list(message.get_all("Requires-Dist") or [])
            eps = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            if eps:
                parser = configparser.ConfigParser(delimiters=("=",))
                parser.optionxform = str  # type: ignore[assignment,method-assign]
                parser.read_string(whl.read(eps[0]).decode())
                if parser.has_section("celeriac"):
                    self.entry_points = {k: v.strip() for k, v in parser.items("celeriac")}


def discover(dist: Path) -> list[Package]:
    """Every ``packages/*/pyproject.toml`` with its wheel and sdist from ``dist``."""
    packages = []
    files = list(dist.iterdir()) if dist.is_dir() else []
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        pkg = Package(project["name"], project["version"], pyproject.parent)
        stem = f"{normalize(pkg.name).replace('-', '_')}-{pkg.version}"
        for path in files:
            base = path.name.lower()
            if base.startswith(stem + "-") and base.endswith(".whl"):
                pkg.wheel = path
            elif base == f"{stem}.tar.gz":
                pkg.sdist = path
        packages.append(pkg)
    return packages


class Check:
    """One fresh venv."""

    def __init__(self, workdir: Path, label: str) -> None:
        self.venv = workdir / re.sub(r"[^a-z0-9]+", "-", label.lower())
        self.label = label
        self.bin = self.venv / "bin"

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run ``argv``; raise ``RuntimeError`` with its output when it fails."""
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def create(self, wheels: list[Path]) -> None:
        """A new venv with ``wheels`` (and their dependencies from the index) installed."""
        self.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], 120)
        self.run([sys.executable, "-m", "pip", "--python", str(self.bin / "python"), "install", "-q",
                  "--disable-pip-version-check", "--no-input", *map(str, wheels)], 900)

    def plugins(self) -> list[dict[str, object]]:
        """``celeriac plugins --json`` in this venv, outside the work tree."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
        out = self.run([str(self.bin / "celeriac"), "plugins", "--json"], 60, env=env)
        return list(json.loads(out))


def _range_ok(pkg: Package, core_version: str) -> str | None:
    """An error when the plugin's ``celeriac`` requirement is not a bounded range admitting
    ``core_version`` (checked with the standard library: ``>=X`` and ``<Y`` clauses)."""
    reqs = [r for r in pkg.requires if re.match(r"^celeriac\s*(?:[<>=!~(]|$)", r)]
    if not reqs:
        return f"{pkg.name} does not depend on celeriac"
    spec = reqs[0].split(";")[0][len("celeriac"):].strip().strip("()")
    clauses = [c.strip() for c in spec.split(",") if c.strip()]
    lower = [c[2:] for c in clauses if c.startswith(">=")]
    upper = [c[1:] for c in clauses if c.startswith("<") and not c.startswith("<=")]
    if not lower or not upper:
        return f"{pkg.name} requires {reqs[0]!r}: expected a range celeriac>=X,<Y"

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    if not key(lower[0]) <= key(core_version) < key(upper[0]):
        return f"{pkg.name} requires {reqs[0]!r}, which excludes the built celeriac {core_version}"
    return None


def check_core(core: Package, workdir: Path, tutorial: bool) -> str:
    """The core alone: only built-ins, and the tutorial on the embedded broker."""
    assert core.wheel is not None
    check = Check(workdir, "core")
    check.create([core.wheel])
    infos = check.plugins()
    names = [str(i["name"]) for i in infos]
    if names != [BUILTIN]:
        raise RuntimeError(f"`celeriac plugins` in a venv with the core alone lists {names}, expected only built-ins")
    note = "`celeriac plugins` lists only the built-ins"
    if tutorial:
        with tempfile.TemporaryDirectory(prefix="celeriac-tutorial-") as cwd:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
            env.pop("PYTHONPATH", None)
            examples = Path(cwd) / "examples"
            shutil.copytree(ROOT / "examples", examples, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
            out = check.run([str(check.bin / "python"), str(examples / "tutorial.py")], 240, env=env)
        if "All tutorial calls gave the expected answers." not in out:
            raise RuntimeError(f"the tutorial did not finish:\n{out[-2000:]}")
        note += "; examples/tutorial.py passed on the embedded broker"
    mismatch = check_spi_mismatch(check, core, workdir)
    return note + f"; a plugin for another plugin interface is refused: {mismatch!r}"


def _probe_wheel(folder: Path) -> Path:
    """A plugin wheel built for another plugin interface: it requires ``celeriac>=99.0,<100``
    and its module raises when imported (it must be refused before it is imported)."""
    import base64
    import hashlib

    files = {
        "celeriac_spi_probe.py": "raise RuntimeError('a plugin for another plugin interface was imported')\n",
        "celeriac_spi_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: celeriac-spi-probe\n"
                                                     "Version: 1.0\nRequires-Dist: celeriac>=99.0,<100\n",
        "celeriac_spi_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: release_check\n"
                                                  "Root-Is-Purelib: true\nTag: py3-none-any\n",
        "celeriac_spi_probe-1.0.dist-info/entry_points.txt": "[celeriac]\nprobe = celeriac_spi_probe\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("celeriac_spi_probe-1.0.dist-info/RECORD,,")
    path = folder / "celeriac_spi_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr("celeriac_spi_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def check_spi_mismatch(check: Check, core: Package, workdir: Path) -> str:
    """A plugin built for another plugin interface is refused with one line naming both versions."""
    probe = _probe_wheel(workdir)
    check.run([sys.executable, "-m", "pip", "--python", str(check.bin / "python"), "install", "-q",
               "--disable-pip-version-check", "--no-deps", str(probe)], 300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
    done = subprocess.run([str(check.bin / "celeriac"), "plugins"], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "celeriac>=99.0,<100" in line]
    expected = f"celeriac {core.version}"
    if done.returncode != 0 or "Traceback" in done.stdout + done.stderr or not lines \
            or not all(expected in line for line in lines):
        raise RuntimeError(f"a plugin for another plugin interface was not refused in one line:\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    return lines[-1].strip()


def check_plugin(pkg: Package, core: Package, workdir: Path) -> str:
    """The core plus one plugin: listed, loaded, importable, with a bounded celeriac range."""
    assert pkg.wheel is not None and core.wheel is not None
    problem = _range_ok(pkg, core.version)
    if problem:
        raise RuntimeError(problem)
    if not pkg.entry_points:
        raise RuntimeError(f"{pkg.name}'s wheel declares no [celeriac] entry point")
    check = Check(workdir, pkg.name)
    check.create([core.wheel, pkg.wheel])
    infos = {str(i["name"]): i for i in check.plugins()}
    provided = []
    for ep_name, target in pkg.entry_points.items():
        info = infos.get(ep_name)
        if info is None or normalize(str(info["distribution"])) != normalize(pkg.name):
            raise RuntimeError(f"`celeriac plugins` does not list {ep_name!r} from {pkg.name}: {sorted(infos)}")
        if info.get("error"):
            raise RuntimeError(f"{pkg.name} failed to load: {info['error']}")
        module = target.split(":")[0]
        check.run([str(check.bin / "python"), "-c", f"import {module}"], 60)
        for label in ("brokers", "backends", "pools", "serializers"):
            if info.get(label):
                provided.append(f"{label}: {', '.join(map(str, info[label]))}")  # type: ignore[call-overload]
    others = sorted(set(infos) - {BUILTIN, *pkg.entry_points})
    if others:
        raise RuntimeError(f"plugins from other packages showed up: {others}")
    return f"listed and imported ({'; '.join(provided) or 'hooks only'})"


def main(argv: list[str] | None = None) -> int:
    """Run every check; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=str(ROOT / "dist"))
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (printed path)")
    args = parser.parse_args(argv)
    packages = discover(Path(args.dist))
    failures = []
    missing = [f"{p.name} ({'wheel' if p.wheel is None else 'sdist'})" for p in packages
               if p.wheel is None or p.sdist is None]
    if missing:
        print(f"release check: FAILED: not built in {args.dist}: {', '.join(missing)} (run nox -s build)")
        return 1
    for pkg in packages:
        pkg.read_wheel()
    core = next(p for p in packages if p.name == CORE)
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-release-check-"))
    started = time.monotonic()
    try:
        jobs = [(core, lambda: check_core(core, workdir, not args.skip_tutorial))]
        jobs += [(p, (lambda p=p: check_plugin(p, core, workdir))) for p in packages if p is not core]
        for pkg, job in jobs:
            t0 = time.monotonic()
            try:
                note = job()
                print(f"release check: ok   {pkg.name} {pkg.version}: {note} ({time.monotonic() - t0:.1f} s)",
                      flush=True)
            except Exception as exc:
                failures.append(pkg.name)
                print(f"release check: FAIL {pkg.name} {pkg.version}: {exc}", flush=True)
    finally:
        if args.keep:
            print(f"venvs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    if failures:
        print(f"release check: FAILED for {', '.join(failures)} ({total:.0f} s)")
        return 1
    print(f"release check: every package installs and loads from its own wheel ({len(packages)} packages, "
          f"{total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
