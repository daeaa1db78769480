"""``celeriac worker``: start a worker with the banner, signals, pidfile and detach."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from celeriac.cli.context import CLIContext, pass_ctx

__all__ = ["worker"]

logger = logging.getLogger("celeriac.worker")


def _check_pidfile(path: str) -> None:
    try:
        with open(path) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid and pid != os.getpid():  # our own pid: a SIGHUP restart re-executed this process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        raise click.ClickException(f"Pidfile {path} names process {pid}, which is still running. "
                                   "Stop that worker first or remove the file if it is stale.")


def _write_pidfile(path: str) -> None:
    with open(path, "w") as handle:
        handle.write(f"{os.getpid()}\n")


def _early_pool_factory(name: str) -> Any:
    """The factory of pool ``name`` from the plugin whose entry point has that name, loading
    no other plugin: a green pool must monkey-patch before the other plugins import their
    client libraries (pika, redis, ssl). None when there is no such plugin."""
    from importlib import metadata

    blocked = {n.strip() for n in os.environ.get("CELERIAC_DISABLED_PLUGINS", "").split(",")}
    if os.environ.get("CELERIAC_DISABLE_PLUGIN_AUTOLOAD") or name in blocked:
        return None
    for entry_point in metadata.entry_points(group="celeriac", name=name):
        try:
            hook = getattr(entry_point.load(), "celeriac_pools", None)
            return (hook() or {}).get(name) if hook is not None else None
        except Exception:  # the full plugin scan reports it
            return None
    return None


def _detach(logfile: str | None) -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if logfile else devnull
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


@click.command()
@click.option("-l", "--loglevel", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL"],
                                case_sensitive=False), help="Logging level.")
@click.option("-c", "--concurrency", type=int, help="Number of threads/processes (default: CPU count).")
@click.option("-P", "--pool", help="Pool: solo, threads, or an installed plugin's (prefork, gevent...).")
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: the default queue).")
@click.option("-X", "--exclude-queues", help="Comma-separated queues not to consume.")
@click.option("-n", "--hostname", help="Node name; %h, %n, %d are expanded (default celery@%h).")
@click.option("-E", "--events", "task_events", is_flag=True, help="Send task events for monitors.")
@click.option("--prefetch-multiplier", type=int, help="Messages reserved per pool slot.")
@click.option("-O", "optimization", type=click.Choice(["default", "fair"]),
              help="'fair' reserves one message per slot (prefetch multiplier 1).")
@click.option("--time-limit", type=float, help="Hard time limit per task, seconds.")
@click.option("--soft-time-limit", type=float, help="Soft time limit per task, seconds.")
@click.option("--max-tasks-per-child", type=int, help="Recycle pool processes after N tasks.")
@click.option("--max-memory-per-child", type=int, metavar="KIB",
              help="Replace a pool process once its peak resident memory passes KIB kilobytes "
                   "(after the task that passed it).")
@click.option("--autoscale", metavar="MAX,MIN",
              help="Grow the pool up to MAX slots while work waits, shrink it to MIN when idle.")
@click.option("--pidfile", type=click.Path(dir_okay=False), help="Write the process id here.")
@click.option("--logfile", "-f", type=click.Path(dir_okay=False), help="Log to this file.")
@click.option("--detach", is_flag=True, help="Run in the background (daemon).")
@click.option("--heartbeat-file", type=click.Path(dir_okay=False),
              help="Touch this file while the consumer is healthy (a liveness probe checks its "
                   "age; see docs/liveness.md).")
@click.option("--heartbeat-file-interval", type=float, default=10.0, show_default=True,
              help="A probe may allow the file this age: it is touched every half of it.")
@pass_ctx
def worker(ctx: CLIContext, loglevel: str, concurrency: int | None, pool: str | None,
           queues: str | None, exclude_queues: str | None, hostname: str | None, task_events: bool,
           prefetch_multiplier: int | None, optimization: str | None, time_limit: float | None,
           soft_time_limit: float | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, pidfile: str | None,
           logfile: str | None, detach: bool, autoscale: str | None, heartbeat_file: str | None,
           heartbeat_file_interval: float) -> None:
    """Start a worker that consumes tasks and runs them."""
    from celeriac.plugins.manager import pool_factory
    from celeriac.worker.autoscale import parse_autoscale
    from celeriac.worker.worker import Worker, setup_logging

    try:
        limits = parse_autoscale(autoscale) if autoscale else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--autoscale") from None
    if pidfile:
        pidfile = os.path.abspath(pidfile)
        _check_pidfile(pidfile)
    if logfile:
        logfile = os.path.abspath(logfile)
    if heartbeat_file:
        heartbeat_file = os.path.abspath(heartbeat_file)
    if heartbeat_file_interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--heartbeat-file-interval")
    if pool:
        factory: Any = _early_pool_factory(pool) or pool_factory(pool)
        early_init = getattr(factory, "early_init", None)
        if early_init is not None:
            early_init()
    if detach:
        _detach(logfile)
    setup_logging(loglevel, logfile)
    if pidfile:
        _write_pidfile(pidfile)
    if optimization == "fair":
        prefetch_multiplier = 1
    app = ctx.app
    try:
        instance = Worker(
            app, hostname=hostname, concurrency=concurrency, pool=pool,
            queues=queues.split(",") if queues else None,
            exclude_queues=exclude_queues.split(",") if exclude_queues else None,
            prefetch_multiplier=prefetch_multiplier, events=task_events, time_limit=time_limit,
            soft_time_limit=soft_time_limit, max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
            install_signals=True, detached=detach, autoscale=limits,
            heartbeat_file=heartbeat_file, heartbeat_file_interval=heartbeat_file_interval,
        )
        app.import_includes()
        click.echo(instance.banner(), err=detach)
        code = instance.start()
    finally:
        if pidfile and os.path.exists(pidfile):
            os.unlink(pidfile)
    sys.exit(code)
