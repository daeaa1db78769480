"""``inspect``, ``control``, ``status`` and ``events``: talking to running workers."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from celeriac.cli.context import CLIContext, pass_ctx

__all__ = ["control", "inspect", "status"]

EX_UNAVAILABLE = 69

INSPECT_COMMANDS = ["ping", "active", "reserved", "scheduled", "revoked", "registered", "stats",
                    "active_queues", "query_task", "conf", "clock"]
CONTROL_COMMANDS = ["revoke", "terminate", "rate_limit", "time_limit", "shutdown", "enable_events",
                    "disable_events", "heartbeat"]
# Positional arguments of each command, in order.
ARGUMENTS: dict[str, list[str]] = {
    "query_task": ["ids*"], "revoke": ["task_id*"], "terminate": ["signal", "task_id*"],
    "rate_limit": ["task_name", "rate_limit"], "time_limit": ["task_name", "soft", "hard"],
}


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


def _remote_command(name: str, methods: list[str], doc: str) -> click.Command:
    """``inspect`` and ``control``: the same options, different method lists."""
    @click.command(name=name, help=doc)
    @click.argument("method", type=click.Choice(methods))
    @click.argument("args", nargs=-1)
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
    "inspect", INSPECT_COMMANDS, "Ask the workers about their state (ping, active, reserved, scheduled, stats, ...).")
control = _remote_command(
    "control", CONTROL_COMMANDS, "Change the workers' behaviour (revoke, rate_limit, time_limit, shutdown, events).")


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
