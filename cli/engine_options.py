"""The engine flags, made from ``EngineArgs``: every command that builds an Engine takes
the same ones (SGLang names; help, defaults and checks live in engine/args.py).

``@engine_options()`` adds one ``typer.Option`` per EngineArgs field to a command and
hands the command the parsed, checked ``engine_args: EngineArgs``::

    @engine_options()
    def serve(engine_args: EngineArgs, port: int = typer.Option(30000, "--port")): ...

Field ``page_size`` is ``--page-size`` (or the names in its ``flags`` metadata), a bool
field is a switch, and a ``list[int]`` field reads ``1,2,4``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Optional

import typer

from sgljax.cli.errors import user_errors
from sgljax.engine.args import EngineArgs, flag_name

PANEL = "Engine options"
PARAM = "engine_args"  # the command's parameter that receives the EngineArgs
FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}
_HINTS = typing.get_type_hints(EngineArgs)


def _is_int_list(name: str) -> bool:
    return list[int] in typing.get_args(_HINTS[name])


def flags(name: str) -> tuple[str, ...]:
    """The CLI names of field ``name``; the first is its canonical spelling."""
    return FIELDS[name].metadata.get("flags") or (flag_name(name),)


def _int_list(name: str, value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{flag_name(name)} expects integers separated by commas, "
                         f"not {value!r}") from None


def _option(name: str, default) -> inspect.Parameter:
    meta = FIELDS[name].metadata
    hint = _HINTS[name]
    extra = {k: v for k, v in meta.items() if k not in ("help", "flags", "inverted")}
    if meta.get("inverted"):  # the switch sets the field false
        default = not default
    if _is_int_list(name):  # typed as text; engine_args_from parses it (errors: one line)
        hint, extra = Optional[str], {"metavar": "N,N,...", **extra}
        default = None if default is None else ",".join(map(str, default))
    option = typer.Option(default, *flags(name), help=meta.get("help"),
                          rich_help_panel=PANEL, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=hint)


def engine_args_from(values: dict) -> EngineArgs:
    """EngineArgs from parsed option values (field names; lists still as text)."""
    kw = {k: v for k, v in values.items() if k in FIELDS}
    for k in kw:
        if _is_int_list(k) and isinstance(kw[k], str):
            kw[k] = _int_list(k, kw[k])
        elif FIELDS[k].metadata.get("inverted"):
            kw[k] = not kw[k]
    return EngineArgs(**kw)


def engine_options(defaults: dict | None = None):
    """Decorator: give the command every engine flag; it receives ``engine_args``.

    ``defaults`` changes a flag's default for this command only (``--help`` shows it).
    The settings are checked before the command runs: a bad one is ``error: ...``, exit 1.
    """
    defaults = defaults or {}
    unknown = set(defaults) - set(FIELDS)
    if unknown:
        raise TypeError(f"not EngineArgs fields: {sorted(unknown)}")

    def wrap(command):
        own = inspect.signature(command, eval_str=True).parameters
        if PARAM not in own:
            raise TypeError(f"{command.__name__} must take an {PARAM!r} parameter")
        clash = set(own) & set(FIELDS)
        if clash:
            raise TypeError(f"{command.__name__} declares engine flags itself: {sorted(clash)}")
        params = [p for p in own.values() if p.name != PARAM] + [
            _option(f.name, defaults.get(f.name, f.default)) for f in FIELDS.values()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            with user_errors():
                args = engine_args_from({k: kwargs.pop(k) for k in FIELDS})
            return command(**kwargs, **{PARAM: args})

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the new signature, not the command's
        return wrapper

    return wrap


def to_flags(values: dict) -> list[str]:
    """``--flag value`` for EngineArgs field values (lists comma-joined; a bool is its
    switch when the value differs from the switch's default, else nothing)."""
    out = []
    for name, value in values.items():
        if name not in FIELDS:
            raise KeyError(f"{name} is not an engine flag")
        if value is None:
            continue
        flag = flags(name)[0]
        if isinstance(value, bool):
            if value != bool(FIELDS[name].metadata.get("inverted")):
                out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out
