"""``celeriac multi``: start and stop several detached workers with pid and log files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click

from celeriac.cli.context import CLIContext

__all__ = ["multi"]


def _nodes(names: tuple[str, ...]) -> list[str]:
    """``3`` means ``celery1 celery2 celery3``; other names are used as given."""
    if len(names) == 1 and names[0].isdigit():
        return [f"celery{i}" for i in range(1, int(names[0]) + 1)]
    return list(names)


def _expand(template: str, node: str) -> str:
    host = socket.gethostname()
    return (template.replace("%n", node).replace("%h", f"{node}@{host}")
            .replace("%d", host.partition(".")[2]))


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _argv(ctx: CLIContext, node: str, pidfile: str, logfile: str, loglevel: str,
          extra: tuple[str, ...]) -> list[str]:
    argv = [sys.executable, "-m", "celeriac"]
    if ctx.app_spec:
        argv += ["-A", ctx.app_spec]
    if ctx.broker:
        argv += ["-b", ctx.broker]
    if ctx.result_backend:
        argv += ["--result-backend", ctx.result_backend]
    argv += ["worker", "--detach", "-n", f"{node}@%h", "--pidfile", _expand(pidfile, node),
             "--logfile", _expand(logfile, node), "-l", loglevel, *extra]
    return argv


def _stop(nodes: list[str], pidfile: str, sig: int, wait: bool, timeout: float = 60.0) -> int:
    pending: dict[str, int] = {}
    for node in nodes:
        pid = _read_pid(_expand(pidfile, node))
        if pid is None or not _alive(pid):
            click.echo(f"> {node}: DOWN")
            continue
        os.kill(pid, sig)
        click.echo(f"> Stopping {node} (pid {pid}) with {signal.Signals(sig).name}...")
        pending[node] = pid
    if not wait:
        return 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for node, pid in list(pending.items()):
            if not _alive(pid):
                click.echo(f"> {node}: DOWN")
                del pending[node]
        time.sleep(0.2)
    if pending:
        click.echo(f"Nodes still running after {timeout:.0f} s: {', '.join(pending)}", err=True)
        return 1
    return 0


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("action", type=click.Choice(["start", "stop", "stopwait", "restart", "kill", "show", "names"]))
@click.argument("nodes", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--pidfile", default="%n.pid", show_default=True, help="Pid file per node (%n = node name).")
@click.option("--logfile", default="%n%I.log", show_default=True, help="Log file per node.")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.pass_context
def multi(click_ctx: click.Context, action: str, nodes: tuple[str, ...], pidfile: str, logfile: str,
          loglevel: str) -> None:
    """Manage several workers: ``celeriac -A proj multi start w1 w2 -- -c 2``.

    Options after ``--`` are passed to every worker. ``stop`` sends SIGTERM (warm shutdown),
    ``stopwait`` also waits for the nodes to exit, ``kill`` sends SIGKILL.
    """
    ctx = click_ctx.find_object(CLIContext)
    assert ctx is not None
    # Node names come first; everything from the first option on is passed to each worker.
    first_option = next((i for i, item in enumerate(nodes) if item.startswith("-")), len(nodes))
    extra = tuple(nodes[first_option:]) + tuple(click_ctx.args)
    names = _nodes(tuple(nodes[:first_option]))
    if not names:
        raise click.UsageError("Give the node names (w1 w2) or a count (3) before the worker options.")
    logfile = logfile.replace("%I", "")
    if action == "names":
        click.echo("\n".join(f"{n}@{socket.gethostname()}" for n in names))
        return
    if action == "show":
        for node in names:
            click.echo(" ".join(_argv(ctx, node, pidfile, logfile, loglevel, extra)))
        return
    if action in ("stop", "stopwait", "kill", "restart"):
        sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
        code = _stop(names, pidfile, sig, wait=action in ("stopwait", "restart"))
        if action != "restart":
            sys.exit(code)
    failed = 0
    click.echo(f"celeriac multi v{__import__('celeriac').__version__}")
    for node in names:
        existing = _read_pid(_expand(pidfile, node))
        if existing and _alive(existing):
            click.echo(f"> {node}: already running (pid {existing})")
            continue
        result = subprocess.run(_argv(ctx, node, pidfile, logfile, loglevel, extra), check=False)
        status = "OK" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        failed += result.returncode != 0
        click.echo(f"> Starting node {node}@{socket.gethostname()}: {status}")
    sys.exit(1 if failed else 0)



