"""Sessions: ``tests`` (everything; the fault suite in its short form), ``demo`` (the seed
tutorial), ``lint``, ``typecheck``, ``bench``, ``faults`` (the fault suite in full)."""

from __future__ import annotations

import pathlib

import nox

ROOT = pathlib.Path(__file__).parent
PACKAGES = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))
# The core first: every plugin depends on it.
PACKAGES.sort(key=lambda p: p.name != "core")
TEST_DEPS = ["pytest>=8", "celery==5.6.2", "redis>=5", "pika>=1.3", "mypy>=1.10", "ruff>=0.5", "flower>=2.0",
             # celeriac-kombu: kombu's SQLAlchemy transport on the machine's PostgreSQL
             "sqlalchemy>=1.4.54,<2.2", "psycopg[binary]>=3.1", "kazoo>=2.9",
             # signed messages (celeriac[auth]) and the test CAs of the TLS tests
             "cryptography>=41"]

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _install_all(session: nox.Session) -> None:
    args: list[str] = []
    for package in PACKAGES:
        args += ["-e", str(package)]
    session.install(*args)


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests, in one venv with all packages installed editable."""
    _install_all(session)
    session.install(*TEST_DEPS)
    paths = [str(p / "tests") for p in PACKAGES if (p / "tests").is_dir()]
    if FAULTS.is_dir():
        paths.append(str(FAULTS))
    session.run("pytest", *paths, *session.posargs)


FAULTS = ROOT / "faults"


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite in full (see faults/README.md): longer flows, the soak, every broker;
    writes the figures RELIABILITY.md carries."""
    _install_all(session)
    session.install(*TEST_DEPS)
    session.run("pytest", str(FAULTS), *session.posargs, env={"CELERIAC_FAULTS": "full"})


@nox.session
def demo(session: nox.Session) -> None:
    """Install the core and run the seed tutorial against a real worker on the embedded broker."""
    session.install("-e", str(ROOT / "packages" / "core"))
    session.run("python", str(ROOT / "examples" / "tutorial.py"), env={"PYTHONUNBUFFERED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on every package."""
    session.install("ruff")
    session.run("ruff", "check", *[str(p) for p in PACKAGES], str(ROOT / "examples"), "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the core."""
    session.install("mypy", "-e", str(ROOT / "packages" / "core"))
    session.run("mypy", "--config-file", str(ROOT / "packages" / "core" / "pyproject.toml"),
                str(ROOT / "packages" / "core" / "src" / "celeriac"))


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against Celery and Dramatiq on the same brokers (see bench/README.md)."""
    _install_all(session)
    # The peers and the bench's own needs (matplotlib for the plots) are in bench/requirements.txt.
    session.install("-r", str(ROOT / "bench" / "requirements.txt"))
    session.run("python", str(ROOT / "bench" / "run.py"), *session.posargs)


DIST = ROOT / "dist"


@nox.session
def build(session: nox.Session) -> None:
    """A wheel and an sdist of every package in dist/ (hatchling through ``python -m build``;
    each wheel is built from its sdist, so an incomplete sdist fails here)."""
    session.install("build>=1.2", "hatchling>=1.21")
    if DIST.exists():
        for old in DIST.iterdir():
            if old.suffix == ".whl" or old.name.endswith(".tar.gz"):
                old.unlink()
    for package in PACKAGES:
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(DIST), str(package),
                    silent=True)
    session.log(f"built {len(PACKAGES)} packages: " + ", ".join(sorted(p.name for p in DIST.iterdir())))


@nox.session
def release_check(session: nox.Session) -> None:
    """Install each package from dist/ in fresh venvs: the core alone (only built-ins, the
    tutorial on the embedded broker), then the core plus each plugin (listed, importable, with a
    celeriac>=X,<Y range). Run ``nox -s build`` first; see .ci/release_check.py."""
    session.run("python", str(ROOT / ".ci" / "release_check.py"), "--dist", str(DIST), *session.posargs)
