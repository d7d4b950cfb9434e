"""Where files live: a local folder or any fsspec URL (s3://, gs://, az://, hf://, ...), one way.

Every path the project takes (SRC, STORE, TOKENS, RUN, a model folder) goes through `as_path`: a
local path stays a `pathlib.Path`, a URL becomes a `upath.UPath` (universal_pathlib, fsspec's
pathlib), so the code that joins, lists, stats, reads and writes folders is the same for both.
What differs, object stores having no rename, no append and no flock, is asked with `is_local`
and handled where it matters (stores/atomic.py, stores/lock.py, stores/shard_journal.py).

Credentials and endpoints are the back-end's own: for S3 the AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) and ~/.aws, exactly as
boto3, s3fs and pyarrow read them; for GCS, GOOGLE_APPLICATION_CREDENTIALS. Anything else is
fsspec's storage_options, given once as `--storage-options JSON` (or the NEXTDETAIL_STORAGE_OPTIONS
environment variable, which the CLI sets so that child processes and Ray workers see the same).
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePath
from typing import Optional, Tuple

STORAGE_OPTIONS_ENV = "NEXTDETAIL_STORAGE_OPTIONS"

# The variables that point a client at its storage and sign its requests: the driver's are given
# to Ray workers (ray_job.runtime_env), so a worker on another node reaches the same bucket.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", STORAGE_OPTIONS_ENV)

# S3's client retries throttling (503 SlowDown), 500s and dropped connections with backoff
# ("standard" mode: exponential with jitter); 10 attempts ride out a busy bucket for ~20 s.
# AWS_MAX_ATTEMPTS and AWS_RETRY_MODE change them, as they do for boto3.
S3_MAX_ATTEMPTS = 10


def is_url(path) -> bool:
    """True for 'scheme://...' other than file://, whatever the object (str, Path, UPath)."""
    if isinstance(path, Path):
        return False
    text = str(path)
    scheme, sep, _ = text.partition("://")
    # "C://x" is a Windows drive, not a scheme; fsspec's chained URLs ("simplecache::s3://") count
    return bool(sep) and len(scheme) > 1 and all(c.isalnum() or c in "+-.:" for c in scheme) \
        and scheme.lower() not in ("file", "local")


def is_local(path) -> bool:
    return not is_url(path)


def storage_options(protocol: Optional[str] = None) -> dict:
    """fsspec storage_options for `protocol`: ours for S3 (retries), then --storage-options'."""
    text = os.environ.get(STORAGE_OPTIONS_ENV)
    user = {}
    if text:
        try:
            user = json.loads(text)
        except ValueError as e:
            from .errors import ConfigError
            raise ConfigError(f"--storage-options: not JSON ({e})") from None
        if not isinstance(user, dict):
            from .errors import ConfigError
            raise ConfigError("--storage-options: must be a JSON object of fsspec storage options")
    base = {}
    if protocol in ("s3", "s3a"):
        retries = {"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)),
                   "mode": os.environ.get("AWS_RETRY_MODE", "standard")}
        base["config_kwargs"] = {"retries": retries, "connect_timeout": 10, "read_timeout": 60}
        # The endpoint is also part of fsspec's cache key of file systems: a long-lived process
        # (a Ray worker) told of another endpoint must not reuse a client of the old one.
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if url:
            base["endpoint_url"] = url
        # Likewise the credentials of the environment, when it gives them (else boto3 finds
        # them in ~/.aws or the instance's role, as usual).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            base["key"], base["secret"] = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
            if os.environ.get("AWS_SESSION_TOKEN"):
                base["token"] = os.environ["AWS_SESSION_TOKEN"]
    # Another process may write what we list (workers write shards the driver then lists):
    # a listing is always asked of the server, never of fsspec's cache.
    base["use_listings_cache"] = False
    base.update(user)
    return base


def set_storage_options(text: Optional[str]) -> None:
    """The CLI's --storage-options: checked, then put where child processes and Ray find it."""
    if text:
        os.environ[STORAGE_OPTIONS_ENV] = text
        storage_options()          # refuse bad JSON now, naming the option


def as_path(path):
    """`path` as a Path (local) or a UPath (URL, with storage_options); a UPath stays as it is."""
    if isinstance(path, PurePath) and not is_url(path):
        return path
    if not is_url(path):
        return Path(path)
    from upath import UPath

    if isinstance(path, UPath):
        return path
    text = str(path)
    protocol = text.partition("://")[0].lower()
    return UPath(text, **storage_options(protocol))


def filesystem(path) -> Tuple[object, str]:
    """(fsspec file system, its path) of a URL or a local path."""
    p = as_path(path)
    if is_url(p):
        return p.fs, p.path
    from fsspec.implementations.local import LocalFileSystem
    return LocalFileSystem(), str(p)


def absolute(path) -> str:
    """What a Ray worker on another node is told: a URL as it is, a local path resolved."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def write_once(path, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole object (or file) in one request: on object storage a PUT is atomic (a
    reader sees the old object, none, or the new one whole). exclusive: fail with
    FileExistsError when the name exists (S3's If-None-Match, GCS's generation match)."""
    p = as_path(path)
    fs, fpath = p.fs, p.path
    if exclusive:
        try:
            fs.pipe_file(fpath, data, mode="create")
        except TypeError:          # a back-end without an exclusive create: check, then write
            if fs.exists(fpath):
                raise FileExistsError(str(p)) from None
            fs.pipe_file(fpath, data)
        except OSError as e:
            if _precondition_failed(e):
                raise FileExistsError(str(p)) from None
            raise
    else:
        fs.pipe_file(fpath, data)


def _precondition_failed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return "PreconditionFailed" in text or "412" in text or isinstance(e, FileExistsError)


def size(path) -> Optional[int]:
    """The size of a file or object in bytes, None when absent."""
    p = as_path(path)
    try:
        if is_url(p):
            info = p.fs.info(p.path)
            return None if info.get("type") == "directory" else int(info["size"])
        return p.stat().st_size if p.is_file() else None
    except FileNotFoundError:
        return None


def sizes(folder) -> dict:
    """{name: size} of the files directly in `folder` ({} when absent), in one listing (one
    request per 1,000 objects on S3, instead of one per file)."""
    p = as_path(folder)
    if not is_url(p):
        if not p.is_dir():
            return {}
        out = {}
        with os.scandir(p) as it:
            for e in it:
                if e.is_file():
                    out[e.name] = e.stat().st_size
        return out
    try:
        entries = p.fs.ls(p.path, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def remove_tree(path) -> None:
    """Remove a folder (every object under a prefix), if there."""
    p = as_path(path)
    if is_url(p):
        try:
            p.fs.rm(p.path, recursive=True)
        except FileNotFoundError:
            pass
    else:
        import shutil
        shutil.rmtree(p, ignore_errors=True)


def copy(src, dst) -> None:
    """Copy a file within one file system; on object storage a server-side copy (no bytes pass
    through this process)."""
    s, d = as_path(src), as_path(dst)
    if is_url(s):
        s.fs.copy(s.path, d.path)
    else:
        import shutil
        shutil.copyfile(s, d)


def endpoint(path) -> str:
    """The server a URL's requests go to, for messages: the S3 endpoint when one is set."""
    p = as_path(path)
    if is_url(p):
        url = None
        client_kwargs = (getattr(p.fs, "client_kwargs", None) or {})
        url = client_kwargs.get("endpoint_url") or getattr(p.fs, "endpoint_url", None)
        if not url and p.protocol in ("s3", "s3a"):
            url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return url or f"{p.protocol}://"
    return "local disk"


def bucket(path) -> str:
    """The bucket (or container) a URL names: 's3://b/x/y' -> 's3://b'."""
    text = str(path)
    scheme, _, rest = text.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def open_input(path, block_size: int = 8 << 20):
    """A binary file object to read `path` (a local file, or an object read by ranges with a
    read-ahead of block_size bytes: a Parquet footer, a tar's headers, an image, whole)."""
    if not is_url(path):
        return open(path, "rb")
    p = as_path(path)
    return p.fs.open(p.path, "rb", block_size=block_size)


def read_bytes(path) -> bytes:
    """A whole file or object, in one read (one GET)."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    p = as_path(path)
    return p.fs.cat_file(p.path)


def read_many(urls) -> dict:
    """{url: bytes, or the exception that reading it raised} of objects read concurrently (fsspec's
    async `cat`: the GETs of a shard's images overlap, so a worker waits one round trip for them,
    not one per image)."""
    urls = list(dict.fromkeys(str(u) for u in urls))
    if not urls:
        return {}
    p = as_path(urls[0])
    paths = {as_path(u).path: u for u in urls}
    got = p.fs.cat(list(paths), on_error="return")
    return {paths[k]: v for k, v in got.items() if k in paths}


def tree_sizes(folder) -> dict:
    """{path relative to `folder`, with '/': size in bytes} of every file under it, from one
    listing (a request per 1,000 objects on object storage); {} when there is nothing there."""
    fs, root = filesystem(folder)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(root):].lstrip("/"): int(info.get("size") or 0)
            for name, info in found.items() if info.get("type", "file") == "file"}


def find_files(folder) -> list:
    """Every file under `folder`, as (path relative to it with '/', full URL or path), sorted by
    relative path. On object storage one paginated listing of the prefix (a request per 1,000
    objects), never a request per folder."""
    p = as_path(folder)
    base = p.path.rstrip("/") + "/"
    found = p.fs.find(p.path, withdirs=False)
    protocol = p.protocol
    out = []
    for key in found:
        if key.startswith(base):
            rel = key[len(base):]
            out.append((rel, f"{protocol}://{key}"))
    out.sort()
    return out


# ----------------------------------------------------------------------------- failures

_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError",
                "ServerDisconnectedError", "Could not connect to the endpoint URL")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "ExpiredToken",
           "InvalidToken", "NoCredentialsError", "Unable to locate credentials", "403")


def _chain(e: BaseException):
    seen = set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)


def storage_failure(e: BaseException):
    """'unreachable' when object storage could not be reached (its endpoint down, the network
    gone), 'denied' when it refused our credentials, else None. Read from the exception chain,
    and from its text, since Ray hands a worker's error home as text."""
    for x in _chain(e):
        text = f"{type(x).__name__}: {x}"
        if any(k in text for k in _UNREACHABLE):
            return "unreachable"
        if (isinstance(x, PermissionError) or "ClientError" in type(x).__name__ or "botocore" in text
                or "s3fs" in text) and any(k in text for k in _DENIED):
            return "denied"
        if type(x).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return "denied"
    return None


def storage_error(e: BaseException, urls=()):
    """The one-line error for a storage failure (see storage_failure), or None: a JobError (exit
    3: rerun once the endpoint is back) naming the endpoint, or a NextDetailError (exit 2: fix the
    credentials) naming the bucket. urls: the command's URLs, to name the right bucket."""
    from .errors import JobError, NextDetailError

    kind = storage_failure(e)
    if kind is None:
        return None
    urls = [u for u in urls if is_url(u)]
    if kind == "unreachable":
        where = endpoint(urls[0]) if urls else (os.environ.get("AWS_ENDPOINT_URL") or "the storage endpoint")
        return JobError(f"cannot reach the object storage at {where}; rerun the same command once it is back "
                        f"(nothing done is lost)")
    buckets = sorted({bucket(u) for u in urls}) or ["the bucket"]
    return NextDetailError(f"{', '.join(buckets)}: access denied with these credentials (AWS_ACCESS_KEY_ID, "
                           f"AWS_SECRET_ACCESS_KEY, ~/.aws, or --storage-options); check them and rerun")
