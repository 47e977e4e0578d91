"""`--config FILE`: a command's options from a TOML file, under those given on the command line.

A scheduler keeps one file per pipeline and overrides a value or two per run; the command line (or the
environment) wins, and each value from the file goes through the same typer/click checks as if typed.
"""

from __future__ import annotations

import tomllib
from enum import Enum
from typing import Any

import typer


def merged_options(ctx: typer.Context, config_file: str | None) -> dict[str, Any]:
    """The command's parameters: given on the command line (or in the environment), else from `config_file`,
    else their defaults. Unknown keys and values of the wrong type are bad arguments (exit 2)."""
    values = dict(ctx.params)
    if config_file:
        try:
            with open(config_file, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise typer.BadParameter(f"cannot read {config_file}: {e.strerror}", param_hint="--config") from None
        except tomllib.TOMLDecodeError as e:
            raise typer.BadParameter(f"{config_file} is not valid TOML: {e}", param_hint="--config") from None
        params = {p.name: p for p in ctx.command.params if p.name != "config_file"}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in params:
                raise typer.BadParameter(f"unknown key {key!r} in {config_file}", param_hint="--config")
            source = ctx.get_parameter_source(name)
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
                continue
            param = params[name]
            try:
                values[name] = None if value is None else param.process_value(ctx, value)
            except typer.BadParameter as e:
                raise typer.BadParameter(f"{key!r} in {config_file}: {e.message}", param_hint="--config") from None
    values.pop("config_file", None)
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


def required(values: dict[str, Any], *names: str) -> None:
    for name in names:
        if values.get(name) is None:
            raise typer.BadParameter(
                f"{name.upper()} is missing: give it on the command line or as `{name}` in --config",
                param_hint=name.upper(),
            )
