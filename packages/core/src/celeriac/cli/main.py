"""``celeriac [-A APP] [-b URL] [--result-backend URL] [--config MODULE] COMMAND``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from celeriac import __version__
from celeriac.cli.context import CLIContext
from celeriac.exceptions import CeleriacError

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Adds plugin commands, and turns Celeriac errors into one line on stderr + exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def _add_plugin_commands(self) -> None:
        if getattr(self, "_plugins_added", False):
            return
        self._plugins_added = True
        from celeriac.plugins.manager import get_manager

        for commands in get_manager().hook.celeriac_cli_commands():
            for command in commands or ():
                self.add_command(command)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CeleriacError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2 if isinstance(exc, (ImportError,)) else 1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", metavar="APP", help="The app: module, module:attr.")
@click.option("-b", "--broker", help="Broker URL (overrides the app's broker_url).")
@click.option("--result-backend", help="Result backend URL (overrides result_backend).")
@click.option("--config", help="Module to load settings from (config_from_object).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Change to this directory first.")
@click.version_option(__version__, prog_name="celeriac")
@click.pass_context
def cli(ctx: click.Context, app_spec: str | None, broker: str | None, result_backend: str | None,
        config: str | None, workdir: str | None) -> None:
    """Celeriac: a distributed task queue that speaks Celery's protocol."""
    ctx.obj = CLIContext(app_spec, broker, result_backend, config, workdir)


def _register_commands() -> None:
    from celeriac.cli import commands, events, multi, remote, worker

    cli.add_command(worker.worker)
    cli.add_command(multi.multi)
    for command in (*commands.COMMANDS, remote.inspect, remote.control, remote.status, events.events):
        cli.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="celeriac")


def echo_json(value: Any) -> None:
    """Print ``value`` as JSON."""
    click.echo(json.dumps(value, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
