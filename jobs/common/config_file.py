"""`--config FILE`: a command's options from a TOML file, under those given on the command line.

A scheduler keeps one file per pipeline and overrides a value or two per run; the command line (or the
environment) wins, and each value from the file goes through the same typer/click checks as if typed.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from enum import Enum
from typing import Any

import typer

from m2f.jobs.common.configs import MAX_CONFIG_FILE_BYTES, MAX_STORAGE_OPTIONS_CHARS, MAX_STRING_CHARS

JSON_KEYS = ("storage_options",)  # options holding JSON text: in the file, a TOML table serialised to it


def merged_options(ctx: typer.Context, config_file: str | None) -> dict[str, Any]:
    """The command's parameters: given on the command line (or in the environment), else from `config_file`,
    else their defaults. Unknown keys, a key spelt two ways, values of the wrong type or over their length,
    and a file over MAX_CONFIG_FILE_BYTES are bad arguments (typer.BadParameter: one line, no value echoed)."""
    values = dict(ctx.params)
    if config_file:
        table = read_table(config_file)
        params = {p.name: p for p in ctx.command.params if p.name != "config_file"}
        for name, (key, value) in _by_name(table, config_file).items():
            if name not in params:
                raise typer.BadParameter(f"unknown key {_short(key)!r} in {config_file}", param_hint="--config")
            source = ctx.get_parameter_source(name)
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
                continue
            value = _plain(name, key, value, config_file)
            try:
                values[name] = None if value is None else params[name].process_value(ctx, value)
            except typer.BadParameter as e:
                raise typer.BadParameter(f"{key!r} in {config_file}: {e.message}", param_hint="--config") from None
    values.pop("config_file", None)
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


def read_table(config_file: str) -> dict[str, Any]:
    """The TOML table of `config_file`: stat first, then at most MAX_CONFIG_FILE_BYTES + 1 bytes read (a
    FIFO or a device that never ends is cut there too)."""
    if len(config_file) > MAX_STRING_CHARS:
        message = f"the path is {len(config_file)} characters long; the most is {MAX_STRING_CHARS}"
        raise typer.BadParameter(message, param_hint="--config")
    too_big = f"{config_file} is over {MAX_CONFIG_FILE_BYTES // 1024**2} MiB; a config file holds options only"
    try:
        info = os.stat(config_file)
        if stat.S_ISDIR(info.st_mode):
            raise typer.BadParameter(f"{config_file} is a folder; give a TOML file", param_hint="--config")
        if info.st_size > MAX_CONFIG_FILE_BYTES:
            raise typer.BadParameter(too_big, param_hint="--config")
        with open(config_file, "rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {config_file}: {e.strerror}", param_hint="--config") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise typer.BadParameter(too_big, param_hint="--config")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise typer.BadParameter(f"{config_file} is not UTF-8 (byte {e.start + 1})", param_hint="--config") from None
    except tomllib.TOMLDecodeError as e:  # its message names a position, never the text there
        raise typer.BadParameter(f"{config_file} is not valid TOML: {e}", param_hint="--config") from None


def _by_name(table: dict[str, Any], config_file: str) -> dict[str, tuple[str, Any]]:
    """option name -> (key as spelt in the file, value); two spellings of one option are refused."""
    found: dict[str, tuple[str, Any]] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in found:
            other = found[name][0]
            raise typer.BadParameter(
                f"both {_short(other)!r} and {_short(key)!r} in {config_file} (one option): keep one",
                param_hint="--config",
            )
        found[name] = (key, value)
    return found


def _plain(name: str, key: str, value: Any, config_file: str) -> Any:
    """A file's value as the command line would give it: a table for a JSON option becomes its JSON text;
    a string over its limit is refused by its length."""
    if name in JSON_KEYS and isinstance(value, dict):
        try:
            value = json.dumps(value)
        except (TypeError, ValueError):  # a TOML date or time has no JSON form
            raise typer.BadParameter(
                f"{key!r} in {config_file}: only strings, numbers, booleans, arrays and tables", param_hint="--config"
            ) from None
    if isinstance(value, dict | list):
        kind = "a table" if isinstance(value, dict) else "an array"
        raise typer.BadParameter(f"{key!r} in {config_file} is {kind}; give one value", param_hint="--config")
    limit = MAX_STORAGE_OPTIONS_CHARS if name in JSON_KEYS else MAX_STRING_CHARS
    if isinstance(value, str) and len(value) > limit:
        raise typer.BadParameter(
            f"{key!r} in {config_file} is {len(value)} characters long; the most is {limit}", param_hint="--config"
        )
    return value


def _short(key: str) -> str:
    return key if len(key) <= 60 else f"{key[:40]}...({len(key)} characters)"


def required(values: dict[str, Any], *names: str) -> None:
    for name in names:
        if values.get(name) is None:
            raise typer.BadParameter(
                f"{name.upper()} is missing: give it on the command line or as `{name}` in --config",
                param_hint=name.upper(),
            )
