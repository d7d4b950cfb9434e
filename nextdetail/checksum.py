"""File integrity: the digest that ties a token store, a run or an evaluation to the exact file
(tokenizer checkpoint, Inception weights) it was made with."""
from __future__ import annotations

import hashlib


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read `chunk` bytes (1 MiB) at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
