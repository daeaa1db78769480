"""``celeriac multi``: start, stop and restart several detached workers, with Celery's command line.

The words after the action are parsed by :mod:`celeriac.cli.multi_args` (pure logic); this module
validates every node before it starts any, runs ``python -m celeriac ... worker --detach`` per
node and signals the processes named by the pid files.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from celeriac import __version__
from celeriac.cli.context import CLIContext
from celeriac.cli.multi_args import (
    MultiSettings,
    MultiUsageError,
    Node,
    OptionTable,
    build_nodes,
    extract_signal,
    parse_argv,
)
from celeriac.exceptions import CeleriacError

__all__ = ["multi"]

ACTIONS = ("start", "stop", "stopwait", "restart", "kill", "show", "names", "expand", "help")
START_TIMEOUT = 30.0  # seconds for a started worker to write its pid file


def read_pid(path: str) -> int | None:
    """The process id in pid file ``path``, or None when it is missing or not a number."""
    try:
        with open(path) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def is_running(pid: int) -> bool:
    """True while process ``pid`` exists, is not a zombie and (where ``/proc`` tells) is Celeriac."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if handle.read().rpartition(b")")[2].split()[:1] == [b"Z"]:
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"celeriac" in handle.read()  # else the pid was reused by another program
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def node_pid(node: Node) -> int | None:
    """The pid of ``node``'s running worker, None when it is down (a stale pid file is removed)."""
    pid = read_pid(node.pidfile)
    if pid is not None and is_running(pid):
        return pid
    if pid is not None:
        with contextlib.suppress(OSError):
            os.unlink(node.pidfile)
    return None


class _Output:
    """Celery's multi output: the splash line, ``> ...`` progress, coloured OK/FAILED/DOWN."""

    def __init__(self, settings: MultiSettings) -> None:
        self.settings = settings
        self.color: bool | None = False if settings.no_color else None

    def note(self, text: str, newline: bool = True) -> None:
        """Print ``text`` unless ``--quiet``."""
        if not self.settings.quiet:
            click.echo(text, nl=newline, color=self.color)

    def splash(self) -> None:
        """The ``celeriac multi vX.Y.Z`` line, unless ``--nosplash``."""
        if not self.settings.nosplash:
            self.note(click.style(f"celeriac multi v{__version__}", fg="cyan", bold=True))

    def status(self, word: str) -> str:
        """``word`` coloured as Celery colours OK, FAILED and DOWN."""
        colour = {"OK": "green", "FAILED": "red", "DOWN": "magenta"}.get(word.split()[0], "yellow")
        return click.style(word, fg=colour, bold=True)


class _Multi:
    """One ``multi`` invocation: its nodes, settings, and the worker command for validation."""

    def __init__(self, click_ctx: click.Context, nodes: list[Node], settings: MultiSettings,
                 passthrough: list[str]) -> None:
        self.ctx = click_ctx
        self.nodes = nodes
        self.settings = settings
        self.passthrough = passthrough
        self.out = _Output(settings)
        self.failures = 0  # nodes that could not be signalled

    # -- validation: everything is checked before any node starts ------------------------------

    def validate(self) -> None:
        """Raise :class:`MultiUsageError` for anything that would make a node fail to start."""
        root = self.ctx.find_root()
        worker = _worker_command(self.ctx)
        for node in self.nodes:
            if worker is not None:
                for command, args, parent in ((root.command, [*node.global_args(), "worker"], None),
                                              (worker, [*node.worker_args(), *self.passthrough], self.ctx)):
                    try:
                        command.make_context(command.name or "celeriac", list(args), parent=parent).close()
                    except click.exceptions.Exit:
                        continue
                    except click.ClickException as exc:
                        raise MultiUsageError(f"Node {node.nodename}: {exc.format_message().rstrip('.')}; "
                                              "see celeriac worker --help for the options.") from None
            self._validate_plugins(node)
        self._validate_apps()
        for node in self.nodes:
            _check_writable(node, "pidfile", node.pidfile)
            _check_writable(node, "logfile", node.logfile)

    def _validate_plugins(self, node: Node) -> None:
        from celeriac.plugins.manager import backend_factory, broker_factory, pool_factory

        checks: list[tuple[str | None, Callable[[str], Any]]] = [
            (node.value("pool"), pool_factory), (node.value("broker"), broker_factory),
            (node.value("result_backend"), backend_factory)]
        for value, factory in checks:
            if value:
                try:
                    factory(value)
                except CeleriacError as exc:
                    raise MultiUsageError(f"Node {node.nodename}: {exc}") from None

    def _validate_apps(self) -> None:
        from celeriac.cli.appload import find_app

        seen: set[tuple[str, str | None]] = set()
        for node in self.nodes:
            spec, workdir = node.value("app_spec"), node.value("workdir")
            if not spec or (spec, workdir) in seen:
                continue
            seen.add((spec, workdir))
            try:
                with _chdir(workdir):
                    find_app(spec)
            except CeleriacError as exc:
                raise MultiUsageError(f"Node {node.nodename}: {exc}") from None
            except Exception as exc:  # the user's module failed to import: say so in one line
                raise MultiUsageError(f"Node {node.nodename}: importing the app {spec!r} failed with "
                                      f"{type(exc).__name__}: {exc}; fix the module and try again.") from None

    # -- starting --------------------------------------------------------------------------------

    def start_node(self, node: Node, prefix: str) -> bool:
        """Start ``node`` unless it runs already; print ``prefix`` + OK/FAILED. True unless it failed."""
        self.out.note(prefix, newline=False)
        pid = node_pid(node)
        if pid is not None:
            self.out.note(self.out.status(f"already running (pid {pid})"))
            return True
        argv = node.argv(self.settings.executable, self.passthrough)
        with tempfile.TemporaryFile() as output:
            try:
                code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                      check=False, timeout=120).returncode
            except subprocess.TimeoutExpired:
                code = -1
            output.seek(0)
            printed = output.read().decode(errors="replace").strip()
        if code != 0:
            self.out.note(self.out.status("FAILED"))
            detail = printed or f"the worker exited with code {code}"
            click.echo("\n".join(f"\t  {line}" for line in detail.splitlines()), err=True)
            return False
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pid = read_pid(node.pidfile)
            if pid is not None and is_running(pid):
                self.out.note(self.out.status("OK"))
                return True
            time.sleep(0.05)
        self.out.note(self.out.status("FAILED"))
        click.echo(f"\t  no running worker wrote {node.pidfile} within {START_TIMEOUT:.0f} s; "
                   f"see {node.logfile}", err=True)
        return False

    def start(self) -> int:
        """Start every node; the exit code (1 when a node failed)."""
        self.out.note("> Starting nodes...")
        failed = [node for node in self.nodes if not self.start_node(node, f"\t> {node.nodename}: ")]
        return 1 if failed else 0

    # -- stopping --------------------------------------------------------------------------------

    def stop(self, sig: int, wait: bool, on_down: Callable[[Node], None] | None = None) -> None:
        """Send ``sig`` to every running node; with ``wait``, return once they are all gone.

        ``on_down`` is called for each node that is down (at once, or when it exits).
        """
        def down(node: Node) -> None:
            if on_down is not None:
                on_down(node)
            else:
                self.out.note(f"> {node.nodename}: {self.out.status('DOWN')}")

        running: dict[Node, int] = {}
        for node in self.nodes:
            pid = node_pid(node)
            if pid is None:
                down(node)
            else:
                running[node] = pid
        if not running:
            return
        self.out.note(click.style("> Stopping nodes...", fg="blue", bold=True))
        name = signal.Signals(sig).name.removeprefix("SIG")
        for node, pid in list(running.items()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.out.note(f"Could not signal {node.nodename} ({pid}): No such process")
                del running[node]
                down(node)
            except PermissionError:
                click.echo(f"Could not signal {node.nodename} ({pid}): permission denied; run multi as the "
                           "user that started the worker.", err=True)
                del running[node]
                self.failures += 1
            else:
                self.out.note(f"\t> {node.nodename}: {name} -> {pid}")
        if wait:
            self._wait(running, down)

    def _wait(self, running: dict[Node, int], down: Callable[[Node], None]) -> None:
        def waiting() -> None:
            count = len(running)
            pids = ", ".join(str(pid) for pid in running.values())
            self.out.note(click.style(f"> Waiting for {count} node{'s' if count != 1 else ''} -> {pids}...",
                                      fg="blue", bold=True), newline=False)

        waiting()
        last_dot = time.monotonic()
        while running:
            time.sleep(0.1)
            for node, pid in list(running.items()):
                if not is_running(pid):
                    del running[node]
                    node_pid(node)  # removes the pid file if the worker could not
                    self.out.note("")
                    self.out.note(f"\t> {node.nodename}: {self.out.status('OK')}")
                    down(node)
                    if running:
                        waiting()
                    last_dot = time.monotonic()
            if running and time.monotonic() - last_dot >= 1.0:
                self.out.note(".", newline=False)
                last_dot = time.monotonic()

    def restart(self, sig: int) -> int:
        """Stop every node (``sig``), start each again once it is gone; the exit code."""
        failed: list[Node] = []

        def start_again(node: Node) -> None:
            prefix = click.style(f"> Restarting node {node.nodename}: ", fg="blue", bold=True)
            if not self.start_node(node, prefix):
                failed.append(node)

        self.stop(sig, wait=True, on_down=start_again)
        return 1 if failed or self.failures else 0

    def kill(self) -> int:
        """SIGKILL every running node and remove the pid files it leaves; the exit code."""
        killed: list[tuple[Node, int]] = []
        for node in self.nodes:
            pid = node_pid(node)
            if pid is None:
                self.out.note(f"> {node.nodename}: {self.out.status('DOWN')}")
                continue
            self.out.note(f"Sending KILL to node {node.nodename} ({pid})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                click.echo(f"Could not signal {node.nodename} ({pid}): permission denied; run multi as the "
                           "user that started the worker.", err=True)
                self.failures += 1
                continue
            killed.append((node, pid))
        deadline = time.monotonic() + 10
        while killed and time.monotonic() < deadline:  # then clear the pid files the workers could not
            killed = [(node, pid) for node, pid in killed if is_running(pid)]
            time.sleep(0.05)
        for node in self.nodes:
            node_pid(node)
        return 1 if self.failures else 0


def _worker_command(click_ctx: click.Context) -> click.Command | None:
    root = click_ctx.find_root()
    if isinstance(root.command, click.Group):
        return root.command.get_command(root, "worker")
    return None


@contextlib.contextmanager
def _chdir(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    previous = os.getcwd()
    os.chdir(os.path.expanduser(path))
    try:
        yield
    finally:
        os.chdir(previous)


def _check_writable(node: Node, option: str, path: str) -> None:
    """Create ``path``'s directory (as Celery does) and check that the file can be written."""
    directory = os.path.dirname(path)
    advice = f"choose a writable place with --{option}=DIR/%n.{'pid' if option == 'pidfile' else 'log'}"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise MultiUsageError(f"Node {node.nodename}: cannot create the {option} directory {directory} "
                              f"({exc.strerror}); {advice}.") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MultiUsageError(f"Node {node.nodename}: the {option} directory {directory} is not writable; "
                              f"{advice}.")
    if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise MultiUsageError(f"Node {node.nodename}: {path} is not a writable file; {advice}.")


def _option_table(click_ctx: click.Context) -> OptionTable:
    return OptionTable.from_commands(click_ctx.find_root().command, _worker_command(click_ctx))


def _global_defaults(click_ctx: click.Context) -> list[str]:
    """Global options given before ``multi`` (``celeriac -A proj multi ...``), passed to every node."""
    ctx = click_ctx.find_object(CLIContext)
    if ctx is None:
        return []
    pairs = (("--app", ctx.app_spec), ("--broker", ctx.broker), ("--result-backend", ctx.result_backend),
             ("--config", ctx.config), ("--workdir", ctx.workdir))
    return [f"{option}={value}" for option, value in pairs if value]


class _MultiCommand(click.Command):
    """Takes every word after ``multi`` as it is (click would split ``-Q:1-3`` and drop ``--``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words = list(args)
        options = words[: words.index("--")] if "--" in words else words
        if "--help" in options or words[:1] in (["-h"], ["help"]):
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit()
        ctx.args = words
        return []

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["ACTION", "NODES", "[WORKER OPTIONS]..."]


@click.command(cls=_MultiCommand, add_help_option=False)
@click.pass_context
def multi(click_ctx: click.Context) -> None:
    """Start, stop and restart several detached workers, as celery multi does.

    \b
    ACTION is start, stop (SIGTERM, returns at once), stopwait (waits until the nodes are
    gone), restart (stopwait, then start with the same options), kill (SIGKILL), show (the
    worker command lines), names, or expand TEMPLATE. NODES are names (w1 w2, or
    name@host) or a count (3 = celery1 celery2 celery3). Then any worker options, in any
    order; OPTION:SELECTOR gives an option to some nodes only (by position, range or name):

    \b
      celeriac multi start w1 -A proj -l info
      celeriac multi start 10 -A proj -l info -Q:1-3 images,video -Q:4,5 data \\
          -Q default -L:4,5 debug
      celeriac multi start 3 -c 3 -c:1 10 --pidfile=/var/run/celery/%n.pid \\
          --logfile=/var/log/celery/%n%I.log
      celeriac multi stopwait w1 --pidfile=/var/run/celery/%n.pid

    \b
    %n is the node name, %h name@host, %d the host's domain, %i/%I the pool process index
    (0 / empty for the main process). Pid and log files default to %n.pid and %n%I.log in
    the current directory. stop, stopwait and restart take a signal (-KILL, -INT, -9).
    Multi's own options: --hostname (the @host part), --range-prefix, --executable,
    --verbose, --quiet, --nosplash, --no-color.
    """
    words = list(click_ctx.args)
    try:
        code = _run(click_ctx, words)
    except MultiUsageError as exc:
        click.echo(f"Error: {exc}", err=True)
        click_ctx.exit(2)
    except KeyboardInterrupt:
        click.echo("\nInterrupted: the nodes already signalled or started keep going; run the same "
                   "command again to finish.", err=True)
        click_ctx.exit(130)
    click_ctx.exit(code)


def _run(click_ctx: click.Context, words: list[str]) -> int:
    if not words or words[0].startswith("-"):
        raise MultiUsageError(f"Give an action first: celeriac multi {'|'.join(ACTIONS[:-1])} NODES [OPTIONS].")
    action, words = words[0], words[1:]
    if action not in ACTIONS:
        raise MultiUsageError(f"Unknown action {action!r}: use one of {', '.join(ACTIONS)}.")
    if action == "help":
        click.echo(click_ctx.get_help(), color=click_ctx.color)
        return 0
    template = ""
    if action == "expand":
        if not words:
            raise MultiUsageError("Give the template to expand: celeriac multi expand %n.log w1 w2.")
        template, words = words[0], words[1:]
    sig = signal.SIGTERM
    if action in ("stop", "stopwait", "restart"):
        given, words = extract_signal(words)
        sig = signal.Signals(given) if given is not None else signal.SIGTERM
    table = _option_table(click_ctx)
    parsed = parse_argv([*_global_defaults(click_ctx), *words], table)
    nodes, settings = build_nodes(parsed, table)
    tool = _Multi(click_ctx, nodes, settings, parsed.passthrough)
    if action == "names":
        click.echo("\n".join(node.nodename for node in nodes))
        return 0
    if action == "expand":
        click.echo("\n".join(node.expand(template) for node in nodes))
        return 0
    if action == "show":
        click.echo("\n".join(shlex.join(node.argv(settings.executable, parsed.passthrough)) for node in nodes))
        return 0
    if action in ("start", "restart"):
        tool.validate()
    tool.out.splash()
    if settings.verbose:
        for node in nodes:
            tool.out.note(f"  {shlex.join(node.argv(settings.executable, parsed.passthrough))}")
    if action == "start":
        return tool.start()
    if action == "kill":
        return tool.kill()
    if action == "restart":
        return tool.restart(sig)
    tool.stop(sig, wait=action == "stopwait")
    return 1 if tool.failures else 0
