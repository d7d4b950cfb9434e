"""The bases array of a format-2 decomposition store: 8-bit values, Zarr shards of many images.

    bases.zarr   uint8 (N, n+1, 3, S, S), dims (image, base, channel, y, x): image i's bases
                 [B_0 = I, B_1, ..., B_n], each q(B_k) = round(255 * clip(B_k, 0, 1)).
                 Sharding codec: shard (M, n+1, 3, S, S), M = shard_images (64 by default);
                 inner chunk (1, n+1, 3, S, S), one per image, zstd level 3 with its frame
                 checksum; the shard index is crc32c-checked (Zarr's default).
                 Shard k is the one file bases.zarr/c.k.0.0.0.0 (chunk key separator ".": one
                 file per shard and no folder per shard) and holds images kM .. kM+M-1.

Why these choices (measured in benchmarks/bench_store_codecs.py, figures in
docs/dataset-store.md): 8-bit bases cost a third of float16 layers (the float16 noise bits do not
compress), zstd on 8-bit meets the size and read-rate targets with Zarr's own codecs, so any Zarr
3 reader decodes the store; one inner chunk per image keeps random access by image one seek
through the shard index; 64 images per shard is ~25 MB at 256 px, order 3 (tens of MB: large
sequential reads, few files, N/64 of them) while a shard is still one Ray task's minute of work.

A shard is written whole, once, by the one task that owns it: encoded in memory by Zarr (the same
bytes Zarr would write itself, tested) and written atomically to a staging file in its run's
journal folder; the job's driver then renames it into bases.zarr when the task's result reaches
it. So a shard file is either absent or complete, two attempts at one shard (a retry after a
lost worker) write the same bytes, and a worker that outlives its driver (a zombie of a killed
job) can never change the store. Zarr's read-modify-write of a shard shared by two writers loses
images; this layout never shares one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..decomp.at import to_host
from ..storage import as_path, is_url, storage_options
from .atomic import write_bytes_atomic

BASES = "bases.zarr"
DTYPE = "uint8"
SHARD_IMAGES = 64
ZSTD_LEVEL = 3
DIMENSIONS = ("image", "base", "channel", "y", "x")


def quantize_bases(bases: Sequence[np.ndarray]) -> np.ndarray:
    """Solver bases [B_0, ..., B_n], each float (B, H, W, 3) in [0, 1], as the store holds them:
    uint8 (B, n+1, 3, H, W), q = round(255 * clip(B_k, 0, 1)), so |q / 255 - B_k| <= 1/510 for
    values in [0, 1]. B_0 = I read from an 8-bit file is stored exactly."""
    b = np.stack([np.asarray(to_host(x), np.float32) for x in bases], axis=1)        # (B, n+1, H, W, 3)
    q = np.rint(np.clip(b, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    return np.ascontiguousarray(q.transpose(0, 1, 4, 2, 3))


def layers_from_bases(q: np.ndarray, space: str = "linear") -> np.ndarray:
    """Stored uint8 bases (..., n+1, 3, H, W) -> float32 layers (..., n+1, 3, H, W) in generation
    order [B_n, D_n, ..., D_1].

    linear (base_detail, specular): D_k = (q_(k-1) - q_k) / 255, exact multiples of 1/255; the
        layers telescope, B_n + D_n + ... + D_1 = q_0 / 255 = I (to float32 rounding).
    log (intrinsic): the same with every base first taken through t = to_unit_log (a 256-entry
        table, `unit_log_table`): [t(q_n), t(q_(n-1)) - t(q_n), ...], summing to t(I) in [0, 1].
    """
    q = np.asarray(q)
    n = q.shape[-4] - 1
    out = np.empty(q.shape, np.float32)
    if space == "log":
        v = unit_log_table()[q]
        out[..., 0, :, :, :] = v[..., n, :, :, :]
        out[..., 1:, :, :, :] = (v[..., :n, :, :, :] - v[..., 1:, :, :, :])[..., ::-1, :, :, :]
        return out
    if space != "linear":
        raise ValueError(f"layer space {space!r}: 'linear' or 'log'")
    d = q[..., :n, :, :, :].astype(np.int16) - q[..., 1:, :, :, :]         # D_1 .. D_n
    out[..., 0, :, :, :] = q[..., n, :, :, :]
    out[..., 1:, :, :, :] = d[..., ::-1, :, :, :]
    out /= np.float32(255.0)          # as imageio.load_image scales 8-bit files: B_0 is I bit for bit
    return out


_UNIT_LOG = None


def unit_log_table() -> np.ndarray:
    """float32 (256,): to_unit_log(v / 255) for each 8-bit value v, computed once, so the store
    reader and the training loader (which indexes a copy on the device) see the same bits."""
    global _UNIT_LOG
    if _UNIT_LOG is None:
        from ..decomp.logspace import to_unit_log
        _UNIT_LOG = to_unit_log(np.arange(256, dtype=np.float32) / np.float32(255.0))
        _UNIT_LOG.setflags(write=False)
    return _UNIT_LOG


def create_bases_array(path, n_images: int, levels: int, size: int, shard_images: int, attributes: dict):
    """The empty array of n_images x (levels + 1) bases (zarr.json only; no shard is written).
    Returns the zarr.Array."""
    import zarr

    return zarr.create_array(store=zarr_store(path), **_layout(n_images, levels + 1, size, shard_images),
                             attributes=attributes, dimension_names=DIMENSIONS, zarr_format=3, overwrite=True)


def zarr_store(path, read_only: bool = False):
    """What zarr opens for bases.zarr at `path`: the local folder, or Zarr's own fsspec store
    for a URL (with the same storage options as every other access)."""
    if not is_url(path):
        return str(path)
    from zarr.storage import FsspecStore

    url = str(path)
    return FsspecStore.from_url(url, storage_options=storage_options(url.partition("://")[0].lower()),
                                read_only=read_only)


def _layout(n_images: int, n_bases: int, size: int, shard_images: int) -> dict:
    from zarr.codecs import ZstdCodec

    return dict(shape=(n_images, n_bases, 3, size, size), chunks=(1, n_bases, 3, size, size),
                chunk_key_encoding={"name": "default", "separator": "."},
                shards=(shard_images, n_bases, 3, size, size), dtype=DTYPE, fill_value=0,
                compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True))


def shard_count(n_images: int, shard_images: int) -> int:
    """How many shards a store of n_images has (the last one may be partial)."""
    return -(-n_images // shard_images)


def shard_key(k: int) -> str:
    """The path of shard k inside bases.zarr (Zarr's default chunk key encoding, "." separator)."""
    return f"c.{k}.0.0.0.0"


def shard_file(store, k: int) -> Path:
    return as_path(store) / BASES / shard_key(k)


def shard_damage(store, k: int, written: int, sizes: Optional[dict] = None) -> Optional[str]:
    """Why shard k's file is not the one written with `written` bytes (its manifest rows'
    shard_bytes), or None when it is. Absent counts as 0 bytes: a shard whose images are all 0
    has no file. The one check of a shard file for both the writer (a rerun redoes such a shard)
    and the reader (which refuses it: Zarr would read a missing shard as zeros); a stat, no read.
    sizes: {file name: size} of bases.zarr from one listing (storage.sizes), for a caller that
    checks every shard: one request per 1,000 shards on object storage instead of one each."""
    from ..storage import size

    have = sizes.get(shard_key(k)) if sizes is not None else size(shard_file(store, k))
    if (have or 0) == written:
        return None
    return "missing shard file" if have is None else f"{have} bytes, written with {written}"


def encode_shard(q: np.ndarray, shard_images: int) -> bytes:
    """The file bytes of a shard holding q (m <= shard_images images, uint8 (m, n+1, 3, S, S));
    images m.. (past the end of the store) are absent. b"" when every image is 0 (nothing to
    store: Zarr writes no chunk that equals the fill value)."""
    import zarr
    from zarr.storage import MemoryStore

    m, n_bases, _, S, _ = q.shape
    if m > shard_images:
        raise ValueError(f"{m} images do not fit a shard of {shard_images}")
    chunks: dict = {}
    arr = zarr.create_array(store=MemoryStore(chunks), **_layout(shard_images, n_bases, S, shard_images),
                            zarr_format=3)
    arr[:m] = q
    data = chunks.get(shard_key(0))
    return b"" if data is None else data.to_bytes()


def decode_shard(data: bytes, shard_images: int, n_bases: int, size: int) -> np.ndarray:
    """The images of a shard file's bytes, uint8 (shard_images, n+1, 3, S, S): what reading
    the shard from bases.zarr gives, decoded from memory (a shard fetched whole in one request
    from object storage, instead of a range request per image)."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    chunks: dict = {}
    arr = zarr.create_array(store=MemoryStore(chunks), **_layout(shard_images, n_bases, size, shard_images),
                            zarr_format=3)
    if data:
        chunks[shard_key(0)] = default_buffer_prototype().buffer.from_bytes(data)
    return np.asarray(arr[:])


def write_shard(path, q: np.ndarray, shard_images: int) -> int:
    """Encode a shard and write it to `path` atomically; returns its size in bytes (0: all of it
    is the fill value, no file). The job's workers write to a staging path (the run's journal
    folder); only the driver moves a staged shard into bases.zarr (shard_journal.commit_shards)."""
    data = encode_shard(q, shard_images)
    path = as_path(path)
    if data:
        write_bytes_atomic(path, data)
    else:
        path.unlink(missing_ok=True)
    return len(data)
