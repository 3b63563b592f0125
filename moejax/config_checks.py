"""Config validation primitives shared by the config modules: one error type whose message names
the dotted field and the fix."""

from __future__ import annotations

from typing import Any, Sequence


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the fix."""


def _fail(field: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{field}={value!r} is invalid: {fix}")


def _check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(field, value, f"choose one of {tuple(choices)}")


def _check_positive(field: str, value: float) -> None:
    if not value > 0:
        _fail(field, value, "must be > 0")
