"""``celeriac events``: watch what the workers report (``--dump``), or a live monitor."""

from __future__ import annotations

import click

from celeriac.cli.context import CLIContext, pass_ctx

__all__ = ["events"]


@click.command()
@click.option("-d", "--dump", is_flag=True, help="Print each event as it arrives.")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
@click.option("-n", "--limit", type=int, default=None, help="Stop after this many events.")
@pass_ctx
def events(ctx: CLIContext, dump: bool, timeout: float | None, limit: int | None) -> None:
    """Watch the events workers send (start workers with -E for task events)."""
    from celeriac.events import EventReceiver, format_event

    receiver = EventReceiver(ctx.app)
    click.echo("-> events: Ready to capture events...", err=True)
    counts: dict[str, int] = {}
    try:
        for event in receiver.itercapture(timeout=timeout, limit=limit):
            if dump:
                click.echo(format_event(event))
            else:
                counts[event.get("type", "?")] = counts.get(event.get("type", "?"), 0) + 1
                summary = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                click.echo(f"\r{summary}", nl=False)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
        if not dump:
            click.echo("")
