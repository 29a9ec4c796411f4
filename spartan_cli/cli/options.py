"""Option specs shared by commands, and the precedence rule: defaults < preset < config file < flags.

A flag overrides the config only when the user typed it (click's parameter source), never by truthiness,
so ``--tolerance 0`` beats a config file's ``tolerance: 0.1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
from click.core import ParameterSource


@dataclass(frozen=True)
class Flag:
    decl: str  # "--lr"
    section: str | None  # config section ("train", "geco", ...) or None for top level
    key: str
    type: object
    help: str


def apply_flags(ctx: click.Context, config: dict, flags: list[Flag]) -> dict:
    """Write every flag the user gave on the command line into ``config`` (in place) and return it."""
    for flag in flags:
        name = flag.decl.lstrip("-").replace("-", "_")
        if ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params[name]
        if flag.section is None:
            config[flag.key] = value
        else:
            existing = config.get(flag.section)
            if existing is not None and not isinstance(existing, dict):
                from spartan_cli.errors import ConfigError

                raise ConfigError(f"config section {flag.section!r} must be a mapping of settings, got "
                                  f"{type(existing).__name__}: {existing!r}")
            section = dict(existing or {})
            section[flag.key] = value
            config[flag.section] = section
    return config


def add_flags(flags: list[Flag]):
    """Decorator adding one click option per Flag (no click default: unset flags leave the config alone)."""

    def decorate(fn):
        for flag in reversed(flags):
            fn = click.option(flag.decl, type=flag.type, default=None, help=flag.help)(fn)
        return fn

    return decorate
