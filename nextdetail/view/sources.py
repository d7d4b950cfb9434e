"""The PATHs of `nextdetail view`, each opened as the adapter of its kind (nextdetail.info.identify).

Every PATH is checked before the server starts: one that is none of the known kinds, or a token
store whose --tokenizer is not its own, is refused in one line (exit status 2), as every command
refuses its inputs. An incomplete store or token store is accepted: its page says it is being
written and shows what can be read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ..errors import first_line
from ..info import Kind, identify, readable_copy, refuse
from ..storage import as_path, is_url
from ..stores.decomposition_format import StoreError
from .run_source import RunSource
from .store_source import StoreSource
from .token_source import TokenSource

Adapter = Union[StoreSource, TokenSource, RunSource, None]


@dataclass
class Source:
    """One PATH: its number in URLs (/s/<number>), what it is, and its adapter (None for an
    incomplete token store, whose files cannot be read as rows until its export finishes)."""

    number: int
    path: Path
    kind: Kind
    adapter: Adapter

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def view(self) -> str:
        """Which pages show it: store, tokens, tokens_incomplete, run, npz."""
        if self.kind.key.startswith("decomposition_store"):
            return "store"
        if self.kind.key == "token_store_incomplete":
            return "tokens_incomplete"
        if self.kind.key == "token_store":
            return "tokens"
        return "npz" if self.kind.key.startswith("npz_") else "run"


def open_source(number: int, path: Path, tokenizer: Optional[Path] = None) -> Source:
    """The adapter of `path`; InfoError / StoreError / TokenStoreError (one line, exit 2) when it
    cannot be shown."""
    kind = identify(path)
    if kind is None:
        raise refuse(path)
    shown = path
    path = readable_copy(path, kind.key)     # a URL: read in place (a store) or from the cache
    key = kind.key
    if key.startswith("decomposition_store"):
        adapter: Adapter = StoreSource(path)
        try:
            adapter.layout                   # a store whose files cannot be read is refused now, not on a page
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(path, f"{kind.phrase} whose files cannot be read yet ({first_line(e, typed=True)}); "
                                   f"try again once its job has created them") from None
    elif key == "token_store":
        adapter = TokenSource(path, tokenizer)
    elif key == "token_store_incomplete":
        adapter = None
    else:
        adapter = RunSource(path, key)
    return Source(number, shown if is_url(shown) and key.startswith("decomposition_store") else path, kind,
                  adapter)


def open_sources(paths, tokenizer: Optional[Path] = None) -> List[Source]:
    return [open_source(i, as_path(p), tokenizer) for i, p in enumerate(paths)]
