"""A token store as the viewer reads it: rows memory-mapped by number (info_facts.TokenRows), the
index a row group at a time, each token map drawn as a picture of its codes, the codebook usage of
each map over a sample of rows, and, with the tokenizer given to `view --tokenizer`, the decoded
reconstruction after each quantization depth.

The tokenizer is loaded the way every command loads one (Tokenizer.from_pretrained: weights only,
verified) and refused unless its sha256 is the one the store recorded, as TokenDataset does.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..info_facts import TokenRows, map_code_counts
from . import images
from .store_query import ManifestPages, Query

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("row", "id", "label", "class_name", "store_index")


class TokenSource:
    """A finished token store, read-only."""

    kind = "tokens"

    def __init__(self, path: Path, tokenizer: Optional[Path] = None):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.tokens = TokenRows(self.path)
        self.meta = self.tokens.meta
        self.pages = ManifestPages(pq.ParquetFile(self.path / "index.parquet"))
        self.tokenizer_path = tokenizer
        self._tokenizer = None
        self._counts: Optional[np.ndarray] = None
        self._recon: "OrderedDict[int, List[np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    @property
    def stamp(self) -> str:
        st = (self.path / "meta.json").stat()
        return f"{st.st_mtime_ns}-{st.st_size}"

    # -- rows ------------------------------------------------------------------------------------
    def listing(self, page: int, per_page: int) -> tuple:
        rows, total = self.pages.page(Query(), page * per_page, per_page)
        cols = [c for c in INDEX_COLUMNS if c in self.pages.names]
        return (self.pages.take(rows, cols) if len(rows) else []), total

    def index_row(self, r: int) -> Optional[dict]:
        if not 0 <= r < self.tokens.N:
            return None
        return self.pages.take(np.asarray([r]), [c for c in INDEX_COLUMNS if c in self.pages.names])[0]

    def maps(self, r: int) -> List[np.ndarray]:
        return self.tokens.maps(self.tokens.rows([r])[0])

    def map_picture(self, r: int, k: int) -> Optional[np.ndarray]:
        if not (0 <= r < self.tokens.N and 0 <= k < len(self.tokens.map_shapes)):
            return None
        return images.token_map_picture(self.maps(r)[k], self.tokens.vocab)

    # -- codebook usage --------------------------------------------------------------------------
    def code_counts(self) -> np.ndarray:
        """int64 (M, vocab) over info_facts' sample of rows, computed once."""
        with self._lock:
            if self._counts is None:
                self._counts = map_code_counts(self.tokens)
            return self._counts

    def usage(self) -> List[Dict]:
        """Per map: shape, codes used, fraction of the vocabulary, the counts sorted (for the histogram)."""
        counts = self.code_counts()
        out = []
        for k, (c, (h, w)) in enumerate(zip(counts, self.tokens.map_shapes)):
            used = int((c > 0).sum())
            out.append({"map": k + 1, "shape": f"{h}x{w}", "used": used, "fraction": used / self.tokens.vocab,
                        "sorted": np.sort(c)[::-1], "base": k < int(self.meta.get("num_base", 0))})
        return out

    # -- decoding --------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer: Path) -> None:
        """TokenStoreError (exit status 2) unless `tokenizer` is the one the tokens were exported
        with (its sha256, as TokenDataset checks it)."""
        from ..pretrained import ModelFolderError, model_sha256, resolve_model
        from ..runs import RunError
        from ..stores.tokens import TokenStoreError

        try:
            ckpt = resolve_model(tokenizer)
        except (RunError, ModelFolderError) as e:
            raise TokenStoreError(self.path, f"--tokenizer {e}") from None
        recorded = (self.meta.get("tokenizer") or {}).get("sha256")
        digest = model_sha256(ckpt)
        if digest != recorded:
            raise TokenStoreError(self.path, f"--tokenizer {ckpt} (sha256 {digest[:12]}...) is not the tokenizer "
                                             f"these tokens were exported with (sha256 {str(recorded)[:12]}...)")

    def _model(self):
        if self._tokenizer is None:
            from ..pretrained import resolve_model
            from ..tokenize.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_pretrained(resolve_model(self.tokenizer_path))
        return self._tokenizer

    def reconstructions(self, r: int) -> List[np.ndarray]:
        """uint8 (H, W, 3) decodings of row r after each depth m = 1..M (a few rows cached)."""
        import torch

        from ..generate.images import decode

        with self._lock:
            if r in self._recon:
                self._recon.move_to_end(r)
                return self._recon[r]
            tok = self._model()
            idx = [torch.from_numpy(m.astype(np.int64))[None] for m in self.maps(r)]
            with torch.no_grad():
                contribs = tok.quantizer.contributions(idx)
                f_hat, out = torch.zeros_like(contribs[0]), []
                for c in contribs:
                    f_hat = f_hat + c
                    out.append(decode(tok, f_hat)[0])
            self._recon[r] = out
            while len(self._recon) > 8:
                self._recon.popitem(last=False)
            return out
