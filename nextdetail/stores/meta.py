"""Checking a store's meta.json before anything reads it: a key missing or of another type is
named in one line (the error class is the store's own), never a KeyError later."""
from __future__ import annotations

from typing import Iterable, Optional

_KIND = {int: "an integer", str: "a string", dict: "an object"}


def check_keys(meta: dict, meta_file, kinds: dict, error, *, required: Optional[Iterable[str]] = None,
               prefix: str = "") -> None:
    """error(meta_file, reason) for the first key of `kinds` ({key: type}) that is missing (when
    in `required`, default all) or holds another type. bool is never an integer here."""
    required = set(kinds if required is None else required)
    for key, kind in kinds.items():
        if key not in meta:
            if key in required:
                raise error(meta_file, f"missing key '{prefix}{key}'")
            continue
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise error(meta_file, f"'{prefix}{key}' is {type(value).__name__} {value!r}, expected {_KIND[kind]}")
