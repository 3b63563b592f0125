"""Dotted command-line overrides of a typed config (``train.lr=3e-4``, ``data.mixture=1,2,1``).

Parsing and type checks are tyro's (per field); the result is re-validated by the dataclasses' own
checks and every failure is a ``ConfigError`` naming the field. Booleans take true/false, 1/0 or
yes/no in any case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import types
import typing
from typing import Sequence

from moejax.config import ConfigError


def _field_type(cls, dotted: str):
    """The annotated type of a dotted field, or raise ConfigError naming the bad part."""
    t = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(t):
            raise ConfigError(f"--set {dotted}: {part!r} is not a config section")
        hints = typing.get_type_hints(t)
        if part not in hints or part.isupper():
            raise ConfigError(f"--set {dotted}: {t.__name__} has no field {part!r}; "
                              f"fields: {[f.name for f in dataclasses.fields(t)]}")
        t = hints[part]
    return t


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def _bool_word(key: str, value: str) -> str:
    """A boolean as tyro spells it (True/False) from what people type (true/1/yes, any case)."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return "True"
    if word in FALSE_WORDS:
        return "False"
    raise ConfigError(f"--set {key}={value!r}: expected a boolean, one of true/false, 1/0, yes/no")


def apply_overrides(cfg, overrides: Sequence[str]):
    """Apply dotted ``key=value`` overrides (``train.lr=3e-4``, ``data.mixture=1,2,1``).

    Each value is parsed and type-checked by tyro against its field's annotation alone (tyro on
    the whole config re-reads every section's source for help text: ~0.3 s a call); the sections
    on the overridden paths are then rebuilt, so their own and the config's checks run again. A
    key given twice takes its last value. Tuple fields take comma-separated values.
    """
    if not overrides:
        return cfg
    values: dict[tuple[str, ...], object] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        values[tuple(key.split("."))] = _parse_value(key, _field_type(type(cfg), key), value)
    return _replace_paths(cfg, values)


def _parse_value(key: str, t, value: str):
    """``value`` parsed by tyro as the annotated type ``t`` of field ``key``."""
    import tyro

    if dataclasses.is_dataclass(t):
        raise ConfigError(f"--set {key}: {key!r} is a config section; set its fields "
                          f"({[f.name for f in dataclasses.fields(t)]})")
    if t is bool:
        value = _bool_word(key, value)
    is_tuple = typing.get_origin(t) is tuple or (
        isinstance(t, types.UnionType) and any(typing.get_origin(a) is tuple for a in t.__args__))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            # '--' ends tyro's options: a value may start with '-' (-1e-3, -x)
            return tyro.cli(t, args=["--", *(value.split(",") if is_tuple else [value])],
                            prog=f"--set {key}")
    except SystemExit as e:  # tyro printed why; keep its words (boxes stripped) in the error
        lines = [ln.strip(" │╭╮╰╯─-") for ln in buf.getvalue().splitlines()]
        why = " ".join(ln for ln in lines if ln and "helptext" not in ln)
        raise ConfigError(f"invalid override {key}={value!r}: {why}") from e


def _replace_paths(obj, values: dict[tuple[str, ...], object]):
    """``obj`` with every dotted path in ``values`` set, each section on a path rebuilt once (so
    its checks see all of its new fields together)."""
    direct = {path[0]: v for path, v in values.items() if len(path) == 1}
    nested: dict[str, dict[tuple[str, ...], object]] = {}
    for path, v in values.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = v
    for name, sub in nested.items():
        direct[name] = _replace_paths(getattr(obj, name), sub)
    return dataclasses.replace(obj, **direct)
