"""``celeriac [-A APP] [-b URL] [--result-backend URL] [--config MODULE] COMMAND``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from celeriac import __version__
from celeriac.cli.context import CLIContext
from celeriac.exceptions import CeleriacError

__all__ = ["cli", "command_args", "main"]

#: Commands whose arguments pass through untouched (``multi`` hands options to each node).
_PASS_THROUGH = {"multi"}


class _Group(click.Group):
    """Adds plugin commands, and turns Celeriac errors into one line on stderr + exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Built-in commands first: loading every plugin imports their client libraries
        # (pika, redis, ssl), which must wait until a green pool has patched (worker -P gevent).
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
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

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register ``cmd``; it also accepts ``-b`` and ``--result-backend`` after its name."""
        if (name or cmd.name) not in _PASS_THROUGH:
            _add_connection_options(cmd)
        super().add_command(cmd, name)

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
    preset = ctx.obj if isinstance(ctx.obj, CLIContext) else None
    ctx.obj = CLIContext(app_spec, broker, result_backend, config, workdir)
    if preset is not None:  # app.start(): the app object is given, not named
        ctx.obj.preset_app = preset.preset_app


def _set_connection_option(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        setattr(ctx.ensure_object(CLIContext), str(param.name), value)


def _add_connection_options(command: click.Command) -> None:
    """Give ``command`` the ``-b/--broker`` and ``--result-backend`` options of the group.

    The guide passes them after the command (``celeriac -A proj worker -b redis://...``); given
    there they override the ones given before it."""
    names = {opt for param in command.params for opt in getattr(param, "opts", ())}
    if "--broker" not in names:
        command.params.append(click.Option(
            ["-b", "--broker"], expose_value=False, callback=_set_connection_option, is_eager=True,
            help="Broker URL (overrides the app's broker_url)."))
    if "--result-backend" not in names:
        command.params.append(click.Option(
            ["--result-backend", "result_backend"], expose_value=False, callback=_set_connection_option,
            is_eager=True, help="Result backend URL (overrides result_backend)."))


def _register_commands() -> None:
    from celeriac.cli import commands, events, multi, remote, worker

    cli.add_command(worker.worker)
    cli.add_command(multi.multi)
    for command in (*commands.COMMANDS, remote.inspect, remote.control, remote.status, events.events):
        cli.add_command(command)


_register_commands()


def command_args(argv: list[str] | None) -> list[str]:
    """The arguments after the program name: ``argv`` as given, or ``sys.argv[1:]`` when None.

    A leading program path (``sys.argv`` passed whole, as Celery's examples do) is dropped."""
    if argv is None:
        return sys.argv[1:]
    args = list(argv)
    if args and (args[0] == sys.argv[0] or args[0].endswith((".py", "/celeriac", "/celery"))):
        args = args[1:]
    return args


def main(argv: list[str] | None = None, app: Any = None) -> None:
    """Console entry point: run the command in ``argv`` (default ``sys.argv[1:]``).

    ``app`` is used instead of ``-A`` (``app.start()``). Exits with the command's exit code."""
    obj = None
    if app is not None:
        obj = CLIContext(None, None, None, None, None)
        obj.preset_app = app
    cli.main(args=command_args(argv) if app is not None else argv, prog_name="celeriac", obj=obj)


def echo_json(value: Any) -> None:
    """Print ``value`` as JSON."""
    click.echo(json.dumps(value, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
