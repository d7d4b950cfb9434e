"""The one check of a file path asked for in a URL: it must name a file inside the source's
folder, after every symlink is resolved.

Refused (None, which the routes answer with 404): an absolute path, any `..` part, a NUL or a
backslash, a path whose real location (symlinks resolved) is outside the folder, a hidden name
(dot files: locks, temp files of a writer), and any suffix not in the allowed list. Percent-encoded
forms (%2e%2e, %2f) arrive here decoded by the server, so they meet the same checks.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

PICTURES = (".png", ".jpg", ".jpeg", ".webp")


def safe_file(root: Path, rel: str, suffixes: Iterable[str] = PICTURES) -> Optional[Path]:
    """root/rel as a real path inside root when it is an existing file with an allowed suffix,
    else None."""
    if not rel or "\x00" in rel or "\\" in rel:
        return None
    parts = PurePosixPath(rel)
    if parts.is_absolute() or rel.startswith("/") or any(p in ("..", ".", "") or p.startswith(".")
                                                         for p in rel.split("/")):
        return None
    if parts.suffix.lower() not in tuple(suffixes):
        return None
    try:
        base = Path(root).resolve(strict=True)
        target = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):          # missing, or a symlink loop
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target
