"""Small commands: ``call``, ``result``, ``purge``, ``plugins``."""

from __future__ import annotations

import json
from typing import Any

import click

from celeriac.cli.context import CLIContext, pass_ctx

__all__ = ["COMMANDS"]


def _json_option(value: str | None, what: str, kind: type) -> Any:
    if not value:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} must be JSON ({exc.msg}), e.g. '[2, 2]' or '{{\"x\": 1}}'.") from None
    if not isinstance(parsed, kind):
        raise click.BadParameter(f"{what} must be a JSON {'array' if kind is list else 'object'}.")
    return parsed


@click.command()
@click.argument("name")
@click.option("-a", "--args", "args_json", help="Positional arguments as a JSON array.")
@click.option("-k", "--kwargs", "kwargs_json", help="Keyword arguments as a JSON object.")
@click.option("--countdown", type=float, help="Run in N seconds.")
@click.option("--eta", help="Run at this ISO 8601 time.")
@click.option("--expires", help="Expire after N seconds or at an ISO 8601 time.")
@click.option("--queue", help="Destination queue.")
@click.option("--exchange", help="Destination exchange.")
@click.option("--routing-key", help="Routing key.")
@click.option("--serializer", default="json", show_default=True)
@pass_ctx
def call(ctx: CLIContext, name: str, args_json: str | None, kwargs_json: str | None,
         countdown: float | None, eta: str | None, expires: str | None, queue: str | None,
         exchange: str | None, routing_key: str | None, serializer: str) -> None:
    """Send the task NAME by name and print its id."""
    args = _json_option(args_json, "--args", list)
    kwargs = _json_option(kwargs_json, "--kwargs", dict)
    expires_value: Any = expires
    if expires is not None:
        try:
            expires_value = float(expires)
        except ValueError:
            expires_value = expires
    result = ctx.app.send_task(name, args, kwargs, countdown=countdown, eta=eta,
                               expires=expires_value, queue=queue, exchange=exchange,
                               routing_key=routing_key, serializer=serializer)
    click.echo(result.id)


@click.command()
@click.argument("task_id")
@click.option("-t", "--timeout", type=float, default=None, help="Wait at most this many seconds.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Print the traceback of a failure.")
@pass_ctx
def result(ctx: CLIContext, task_id: str, timeout: float | None, show_traceback: bool) -> None:
    """Print the result of TASK_ID (waits for it)."""
    handle = ctx.app.AsyncResult(task_id)
    if show_traceback:
        click.echo(handle.traceback or "")
        return
    value = handle.get(timeout=timeout, propagate=False)
    if isinstance(value, BaseException):
        click.echo(f"{handle.state}: {type(value).__name__}: {value}")
        raise SystemExit(1)
    click.echo(json.dumps(value, default=str) if not isinstance(value, str) else value)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("-Q", "--queues", help="Comma-separated queues to purge (default: all known).")
@click.option("-X", "--exclude-queues", help="Comma-separated queues to keep.")
@pass_ctx
def purge(ctx: CLIContext, force: bool, queues: str | None, exclude_queues: str | None) -> None:
    """Delete all waiting task messages from the queues."""
    app = ctx.app
    names = [q for q in (queues.split(",") if queues else list(app.router.queues)) if q]
    excluded = set(exclude_queues.split(",")) if exclude_queues else set()
    names = [n for n in names if n not in excluded]
    if not force:
        click.confirm(f"Delete all messages from {len(names)} queue(s): {', '.join(names)}? "
                      "This cannot be undone.", abort=True, err=True)
    total = 0
    parked = len(app.broker.scheduled(names, limit=1_000_000))
    for name in names:
        total += app.broker.purge(name)
    note = f" ({parked} of them waiting for their ETA)" if parked else ""
    click.echo(f"Purged {total} message{'s' if total != 1 else ''} from {len(names)} known "
               f"task queue{'s' if len(names) != 1 else ''}{note}.")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List installed plugins: distribution, version and what each provides."""
    from celeriac.plugins.manager import plugin_infos

    infos = plugin_infos()
    if as_json:
        click.echo(json.dumps([info.__dict__ for info in infos], indent=2))
        return
    for info in infos:
        click.echo(f"{info.name}  ({info.distribution} {info.version})")
        if info.error:
            click.echo(f"    FAILED TO LOAD: {info.error}")
            continue
        for label, names in (("brokers", info.brokers), ("backends", info.backends),
                             ("pools", info.pools), ("serializers", info.serializers)):
            if names:
                click.echo(f"    {label + ':':<12} {', '.join(names)}")


COMMANDS = [call, result, purge, plugins]
