"""click options made from :class:`worker.settings.WorkerSettings` fields: the same variable
(``envvar=``), default, help and validation as the Lambda function's settings.

The environment is read by click while it parses a command line, after the eager ``--help``:
a bad variable never breaks ``--help``, and is reported as one usage error naming the variable,
its value and why (:class:`EnvOption`)."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from worker.settings import SettingsError, WorkerSettings, env_name


class EnvOption(click.Option):
    """An option whose value may come from an environment variable: a bad value from there is
    an error that names the variable, not only the flag."""

    def process_value(self, ctx: click.Context, value):
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as error:
            if ctx.get_parameter_source(self.name) is not ParameterSource.ENVIRONMENT:
                raise
            names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or ())
            variable = next((name for name in names if os.environ.get(name)), None)
            if variable is None:
                raise
            raw = os.environ[variable]
            reason = error.message.removeprefix(f"{raw!r}: ")
            raise click.BadParameter(f"environment variable {variable}={raw!r}: {reason}", ctx, self) from None


class SettingType(click.ParamType):
    """Validates a value as the :class:`WorkerSettings` field does."""

    def __init__(self, field: str, metavar: str | None = None):
        self.field = field
        self.name = metavar or field
        self._metavar = metavar

    def get_metavar(self, param, ctx=None):  # click >= 8.2 passes ctx
        return self._metavar

    def convert(self, value, param, ctx):
        if value is None:
            return None
        try:
            return WorkerSettings.check(self.field, value)
        except SettingsError as error:
            self.fail(f"{value!r}: {error}", param, ctx)


def setting_option(field: str, *decls: str, env: bool = True, extra_help: str = "", **kwargs):
    """A click option for the ``WorkerSettings`` field ``field``: its type, default and help, and
    (with ``env``) its variable. ``decls`` default to ``--field-name``; ``kwargs`` override."""
    info = WorkerSettings.model_fields[field]
    variable = env_name(field)
    options = dict(cls=EnvOption, default=info.default, show_default=info.default is not None,
                   help=" ".join(filter(None, [info.description, extra_help, f"Env: {variable}." if env else ""])))
    if info.annotation is bool:
        decls = decls or (f"--{field.replace('_', '-')}/--no-{field.replace('_', '-')}",)
    else:
        options["type"] = SettingType(field, kwargs.pop("metavar", None) or _metavar(info.annotation))
    if env:
        options["envvar"] = variable
    options.update(kwargs)
    return click.option(*(decls or (f"--{field.replace('_', '-')}",)), **options)


def _metavar(annotation) -> str:
    """INTEGER / FLOAT / TEXT, as click shows its own types."""
    text = str(annotation)
    return "INTEGER" if "int" in text else "FLOAT" if "float" in text else "TEXT"
