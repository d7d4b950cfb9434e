"""Command-line options derived from typed configs, so that each setting is written once.

A config is a dataclass. A field becomes an option when it is declared with `opt`, which keeps
the help text (and, where needed, the flag, metavar, choices or argparse action) in the
field's metadata; its type and default come from the field itself:

    @dataclass(frozen=True)
    class DecomposeDatasetConfig:
        size: int = opt(256, "shorter side resized to N (Lanczos), centre-cropped N x N", metavar="N")

`add_options(parser, DecomposeDatasetConfig)` adds `--size N` with type int, default 256 and the
help "... (default 256)"; `build(DecomposeDatasetConfig, args)` makes the config from the parsed
arguments. The config's __post_init__ validates and raises ConfigError naming the option. A
field declared with `nested()` holds another config whose options are added and built in place
(the AT parameters inside the dataset job's config).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError
from .storage import as_path

_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, flag: Optional[str] = None, positional: bool = False,
        factory: Optional[Callable[[], Any]] = None, gt=None, ge=None, lt=None, le=None,
        **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring).

    default  : the field's default; omitted for a required option.
    flag     : the option's name when it is not --field-name (e.g. "--quantizer" for `kind`).
    positional: a positional argument (metavar and nargs in argparse_kwargs).
    gt, ge, lt, le: bounds of a numeric option, checked where it is parsed (with finiteness:
               nan and inf are refused for every float option).
    argparse_kwargs : metavar, choices, nargs, type, action, const, ... as argparse takes them.
    """
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    meta = {"option": {"help": help, "flag": flag, "positional": positional, **argparse_kwargs},
            "bounds": bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def derived(default: Any, help: str) -> Any:
    """A field whose value comes from the data, not from the command line (a tokenizer's
    decomposition is its training store's): no option is added for it; `build` takes it from the
    parsed arguments where the command has put it (a config's `derive(args)`, called first)."""
    return dataclasses.field(default=default, metadata={"derived": help})


def nested(factory: Callable[[], Any]) -> Any:
    """A field holding another config whose options are added and built in place."""
    return dataclasses.field(default_factory=factory, metadata={"nested": True})


def _base_type(hint) -> tuple:
    """(type, optional) of a field annotation: Optional[int] -> (int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def int_tuple(text: str) -> tuple:
    """'1,2,4,8' -> (1, 2, 4, 8), for options that are lists of sizes."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def bounds_text(kind, bounds: dict) -> str:
    """'an integer >= 1', 'a finite number > 0 and < 1'."""
    limits = " and ".join(f"{_WORDS[k]} {v:g}" for k, v in bounds.items())
    return ("an integer" if kind is int else "a finite number") + (" " + limits if limits else "")


def out_of_bounds(value, bounds: dict) -> bool:
    return any({"gt": value <= b, "ge": value < b, "lt": value >= b, "le": value > b}[k] for k, b in bounds.items())


def number(kind, bounds: dict):
    """The argparse type of a numeric option: parses, then refuses nan, inf and values out of
    bounds, so that a bad number is named where it is parsed ("--lr must be a finite number > 0,
    got nan")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or out_of_bounds(value, bounds):
            raise argparse.ArgumentTypeError(f"must be {bounds_text(kind, bounds)}, got {text}")
        return value

    parse.__name__ = kind.__name__            # argparse names the type in some messages
    return parse


def _describe(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 100_000:
        return f"{value:,}"
    return str(value)


def option_fields(cls) -> list:
    """(field, type hint) of every option of cls, nested configs expanded, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out += option_fields(hints[f.name])
        elif "option" in f.metadata:
            out.append((f, hints[f.name]))
    return out


def _flag(f) -> str:
    o = f.metadata["option"]
    if o["positional"]:
        return o.get("metavar") or f.name.upper()
    return o["flag"] or "--" + f.name.replace("_", "-")


def flag_of(cls, name: str) -> str:
    """The option a field of cls (nested configs included) is set by: flag_of(TokenizerConfig,
    "image_size") -> "--image-size", flag_of(QuantConfig, "kind") -> "--quantizer"; a positional's
    metavar ("RUN"). Messages name options with it, never config fields. KeyError for a field
    that is no option."""
    for f, _ in option_fields(cls):
        if f.name == name:
            return _flag(f)
    raise KeyError(f"{cls.__name__} has no option for the field {name!r}")


def option_name(cls, name: str) -> Optional[str]:
    """flag_of, or None for a field that is no option (a derived or fixed setting)."""
    try:
        return flag_of(cls, name)
    except KeyError:
        return None


def add_options(parser, cls, *, skip: tuple = ()) -> None:
    """Add an argparse option (or positional) for every `opt` field of cls, nested included."""
    def first(item):        # what a command needs (positional, required) before what it may take
        f = item[0]
        return not (f.metadata["option"]["positional"] or
                    (f.default is _MISSING and f.default_factory is _MISSING))

    for f, hint in sorted(option_fields(cls), key=first):
        if f.name in skip:
            continue
        o = dict(f.metadata["option"])
        help_text, positional = o.pop("help"), o.pop("positional")
        del o["flag"]                                   # _flag(f) names the option
        kind, optional = _base_type(hint)
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else _MISSING)
        action = o.get("action")
        if action is None and "type" not in o:
            if kind is bool:
                o["action"] = "store_false" if default is True else "store_true"
            elif kind in (int, float, str):
                o["type"] = number(kind, f.metadata.get("bounds", {})) if kind in (int, float) else kind
                if "choices" not in o:
                    o.setdefault("metavar", {int: "N", float: "X", str: f.name.upper()}[kind])
            elif kind is Path:
                o["type"] = as_path          # a local Path, or a URL (s3://...) as a UPath
            elif typing.get_origin(kind) is tuple:
                o["type"] = int_tuple
                o.setdefault("metavar", "N,N,...")
        if positional:
            parser.add_argument(f.name, help=help_text, **o)
            continue
        name = _flag(f)
        if default is _MISSING:
            parser.add_argument(name, dest=f.name, required=True, help=help_text, **o)
            continue
        shown = o.pop("default_help", None)
        if shown is None and default is not None and o.get("action") not in ("store_true", "store_false",
                                                                             "store_const"):
            shown = _describe(default)
        help_text = f"{help_text} (default {shown})" if shown is not None and help_text else help_text
        parser.add_argument(name, dest=f.name, default=default, help=help_text, **o)


def build(cls, args: argparse.Namespace, **given):
    """cls from parsed arguments (nested configs built in place); `given` overrides fields.
    A config that refuses its values raises ConfigError (ValueErrors are turned into one).
    A config class with a `derive(args)` class method is given the arguments first, to add the
    values of its `derived` fields."""
    if hasattr(cls, "derive"):
        cls.derive(args)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.metadata.get("nested"):
            values[f.name] = build(hints[f.name], args)
        elif ("option" in f.metadata or "derived" in f.metadata) and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_int(name: str, value, low: int = 1, *, optional: bool = False) -> None:
    """ConfigError "--name must be an integer >= low, got V" unless value is one."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
