"""``inspect``, ``control``, ``status`` and ``events``: talking to running workers."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from celeriac.cli.context import CLIContext, pass_ctx

__all__ = ["control", "inspect", "status"]

EX_UNAVAILABLE = 69

#: ``celeriac inspect`` commands: name -> (arguments, one-line description).
INSPECT_COMMANDS: dict[str, tuple[str, str]] = {
    "ping": ("", "Ping the workers."),
    "active": ("", "List the tasks the workers are running."),
    "reserved": ("", "List the tasks prefetched and not started yet."),
    "scheduled": ("", "List the tasks waiting for their ETA (held or parked)."),
    "revoked": ("", "List the ids of the tasks the workers revoked."),
    "registered": ("", "List the task names each worker knows."),
    "stats": ("", "Show worker statistics (pool, broker, totals)."),
    "active_queues": ("", "List the queues each worker consumes from."),
    "query_task": ("ID...", "Show what the workers know about task ids."),
    "conf": ("", "Show the settings that differ from the defaults."),
    "clock": ("", "Show the workers' logical clock."),
}
#: ``celeriac control`` commands: name -> (arguments, one-line description).
CONTROL_COMMANDS: dict[str, tuple[str, str]] = {
    "revoke": ("ID...", "Revoke tasks: the workers will not run them."),
    "terminate": ("SIGNAL ID...", "Revoke; also kill running ones with SIGNAL."),
    "rate_limit": ("TASK RATE", "Set a task's rate limit (10/m; 0 removes it)."),
    "time_limit": ("TASK SOFT [HARD]", "Set a task's time limits (seconds)."),
    "add_consumer": ("QUEUE [EXCHANGE TYPE KEY]", "Start consuming from a queue."),
    "cancel_consumer": ("QUEUE", "Stop consuming from a queue."),
    "pool_grow": ("[N]", "Add N pool processes/threads (default 1)."),
    "pool_shrink": ("[N]", "Remove N pool processes/threads (default 1)."),
    "autoscale": ("MAX MIN", "Set the pool's autoscale limits."),
    "enable_events": ("", "Tell the workers to send task events."),
    "disable_events": ("", "Tell the workers to stop sending events."),
    "heartbeat": ("", "Ask the workers for a heartbeat event."),
    "shutdown": ("", "Warm shutdown of the workers."),
}
# Positional arguments of each command, in order ("*": the rest).
ARGUMENTS: dict[str, list[str]] = {
    "query_task": ["ids*"], "revoke": ["task_id*"], "terminate": ["signal", "task_id*"],
    "rate_limit": ["task_name", "rate_limit"], "time_limit": ["task_name", "soft", "hard"],
    "add_consumer": ["queue", "exchange", "exchange_type", "routing_key"],
    "cancel_consumer": ["queue"], "pool_grow": ["n"], "pool_shrink": ["n"], "autoscale": ["max", "min"],
}


class _RemoteCommand(click.Command):
    """Lists its remote commands one per line, with a description, under ``Commands:``."""

    def __init__(self, *args: Any, table: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, f"{args}: {text}" if args else text)
                                for name, (args, text) in self.table.items()])
        super().format_epilog(ctx, formatter)


def _compile(command: str, args: tuple[str, ...]) -> dict[str, Any]:
    names = ARGUMENTS.get(command, [])
    result: dict[str, Any] = {}
    values = list(args)
    for name in names:
        if name.endswith("*"):
            result[name[:-1]] = values
            values = []
            break
        if values:
            value: Any = values.pop(0)
            try:
                value = json.loads(value)
            except ValueError:
                pass
            result[name] = value
    if values:
        raise click.UsageError(f"Too many arguments for {command}: {' '.join(values)}")
    return result


def _print_replies(replies: list[dict[str, Any]], as_json: bool) -> None:
    if not replies:
        click.echo("Error: No nodes replied within time constraint", err=True)
        sys.exit(EX_UNAVAILABLE)
    if as_json:
        merged: dict[str, Any] = {}
        for reply in replies:
            merged.update(reply)
        click.echo(json.dumps(merged, indent=2, default=str))
        return
    for reply in replies:
        for node, value in reply.items():
            ok = not (isinstance(value, dict) and "error" in value)
            click.echo(f"->  {node}: {'OK' if ok else 'ERROR'}")
            if isinstance(value, dict) and set(value) <= {"ok", "error"}:
                click.echo(f"        {value.get('ok', value.get('error'))}")
            elif isinstance(value, list) and not value:
                click.echo("    - empty -")
            elif isinstance(value, list):  # one line per item, as Celery prints them
                for item in value:
                    click.echo(f"    * {item}")
            else:
                for line in json.dumps(value, indent=2, default=str).splitlines():
                    click.echo("    " + line)
    count = sum(len(r) for r in replies)
    click.echo(f"\n{count} node{'s' if count != 1 else ''} online.")


def _remote(ctx: CLIContext, command: str, args: tuple[str, ...], timeout: float, destination: str | None,
            as_json: bool) -> None:
    arguments = _compile(command, args)
    if command == "terminate":
        command = "revoke"
        arguments["terminate"] = True
    targets = [d.strip() for d in destination.split(",")] if destination else None
    replies = ctx.app.control.broadcast(command, arguments, destination=targets, reply=True,
                                        timeout=timeout)
    _print_replies(replies, as_json)


def _remote_command(name: str, table: dict[str, tuple[str, str]], doc: str) -> click.Command:
    """``inspect`` and ``control``: the same options, different command tables."""
    @click.command(name=name, help=doc, cls=_RemoteCommand, table=table)
    @click.argument("method", metavar="COMMAND", type=click.Choice(list(table)), required=True)
    @click.argument("args", nargs=-1, metavar="[ARGS]...")
    @click.option("-t", "--timeout", type=float, default=1.0, show_default=True,
                  help="Seconds to wait for replies.")
    @click.option("-d", "--destination", help="Comma-separated node names (default: all).")
    @click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
    @pass_ctx
    def command(ctx: CLIContext, method: str, args: tuple[str, ...], timeout: float,
                destination: str | None, as_json: bool) -> None:
        _remote(ctx, method, args, timeout, destination, as_json)

    return command


inspect = _remote_command(
    "inspect", INSPECT_COMMANDS,
    "Ask the running workers about their state: celeriac -A proj inspect COMMAND. Needs a broker "
    "with broadcast (the embedded SQLite broker, Redis, RabbitMQ, AMQP 1.0).")
control = _remote_command(
    "control", CONTROL_COMMANDS,
    "Change the running workers' behaviour: celeriac -A proj control COMMAND [ARGS]...")


@click.command()
@click.option("-t", "--timeout", type=float, default=1.0, show_default=True, help="Seconds to wait for replies.")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status(ctx: CLIContext, timeout: float, as_json: bool) -> None:
    """List the workers that answer a ping."""
    replies = ctx.app.control.ping(timeout=timeout)
    if not replies:
        click.echo("Error: No nodes replied within time constraint", err=True)
        sys.exit(EX_UNAVAILABLE)
    nodes = sorted(node for reply in replies for node in reply)
    if as_json:
        click.echo(json.dumps(nodes))
        return
    for node in nodes:
        click.echo(f"{node}: OK")
    click.echo(f"\n{len(nodes)} node{'s' if len(nodes) != 1 else ''} online.")
