"""``celeriac events``: a live full-screen monitor of workers and tasks, or ``--dump`` of every event."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from celeriac.cli.context import CLIContext, pass_ctx

if TYPE_CHECKING:
    from celeriac.events import EventReceiver

__all__ = ["events"]

NOT_A_TERMINAL = ("Error: the live monitor needs a terminal (standard input and output are not both one); "
                  "use `celeriac events --dump` to print events as lines.")


@click.command()
@click.option("-d", "--dump", is_flag=True, help="Print each event as a line instead of the live monitor.")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
@click.option("-n", "--limit", type=int, default=None, help="With --dump: stop after this many events.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Live monitor: how many recent tasks to keep.")
@pass_ctx
def events(ctx: CLIContext, dump: bool, timeout: float | None, limit: int | None, max_tasks: int) -> None:
    """Watch the events workers send (start workers with -E for task events).

    Without --dump this opens a live full-screen monitor, like `top`: workers (status, active and
    processed tasks, heartbeat age) and the most recent tasks (state, worker, runtime, args,
    result or exception). Up/Down or j/k select a task, Enter shows all of it, Esc goes back,
    q or Ctrl-C quits. The monitor needs a terminal: when standard input or output is not one
    (piped, redirected) it prints an error suggesting --dump and exits with status 2.
    """
    if not dump and not (sys.stdout.isatty() and sys.stdin.isatty()):
        click.echo(NOT_A_TERMINAL, err=True)
        click.get_current_context().exit(2)
    from celeriac.events import EventReceiver, format_event

    receiver = EventReceiver(ctx.app)
    try:
        if dump:
            click.echo("-> events: Ready to capture events...", err=True)
            try:
                for event in receiver.itercapture(timeout=timeout, limit=limit):
                    click.echo(format_event(event))
            except KeyboardInterrupt:
                pass
        else:
            _monitor(receiver, ctx.app.broker.safe_url, timeout, max_tasks)
    finally:
        receiver.close()


def _monitor(receiver: EventReceiver, title: str, timeout: float | None, max_tasks: int) -> None:
    try:
        import curses

        from celeriac.cli.monitor import run_monitor
    except ImportError as exc:  # Windows without the windows-curses package
        click.echo(f"Error: the live monitor needs the curses module ({exc}); "
                   "use `celeriac events --dump`.", err=True)
        click.get_current_context().exit(2)
    try:
        run_monitor(receiver, title, timeout=timeout, max_tasks=max_tasks)
    except curses.error as exc:
        click.echo(f"Error: this terminal cannot show the live monitor ({exc}); "
                   "check TERM, or use `celeriac events --dump`.", err=True)
        click.get_current_context().exit(2)
