"""The global CLI options and the lazily loaded app."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import click

__all__ = ["CLIContext", "pass_ctx"]


@dataclass
class CLIContext:
    """Global options, and the app loaded from them on first use."""

    app_spec: str | None
    broker: str | None
    result_backend: str | None
    config: str | None
    workdir: str | None
    #: An app object given directly (``app.start()``), used instead of ``app_spec``.
    preset_app: Any = None
    _app: Any = None

    @property
    def app(self) -> Any:
        """The app named by ``-A`` (or a bare app when none was given), with CLI overrides."""
        if self._app is None:
            if self.workdir:
                os.chdir(self.workdir)
            if self.preset_app is not None:
                app = self.preset_app
            elif self.app_spec:
                from celeriac.cli.appload import find_app

                app = find_app(self.app_spec)
            else:
                from celeriac.app import Celeriac

                app = Celeriac()
            if self.config:
                app.config_from_object(self.config)
            if self.broker:
                os.environ["CELERIAC_BROKER_URL"] = self.broker
            if self.result_backend:
                os.environ["CELERIAC_RESULT_BACKEND"] = self.result_backend
            self._app = app
        return self._app


pass_ctx = click.make_pass_decorator(CLIContext)


