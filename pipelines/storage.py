"""One way to reach storage: s3://, file:// and plain paths through fsspec.

The S3 endpoint comes from the environment (AWS_ENDPOINT_URL), never from configs.
Credentials are never handed to s3fs: botocore finds them in each process (an
AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE, as `enat services` sets them, an instance
profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), so a pickled filesystem (Ray Tune
pickles its storage filesystem into the experiment folder) carries the endpoint only.
Objects are published atomically: written under a temporary key in a `_tmp/` folder beside the target, then
moved into place, so a reader never sees half an object. A crash leaves only temporary
keys, which `remove_temporaries` deletes on the next run.
An outage of the S3 store is ridden out: every request is retried for a while
(ENAT_STORAGE_RETRY_SECONDS, default 120; see pipelines/s3_retry.py), then fails with one
line naming the endpoint (StorageUnreachable, a StorageError).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from enat.models.errors import UserError

TMP_DIR = "_tmp"


class StorageError(UserError, RuntimeError):
    """Storage is unreachable, refuses our credentials, or the path is wrong."""


class StorageUnreachable(StorageError):
    """The object store did not answer (or kept failing) for the whole retry window. Not an
    OSError, which s3fs swallows in places (a failed listing of a parent folder)."""


# What botocore resolves credentials from: a change in any of them needs a new client.
_CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                       "AWS_SHARED_CREDENTIALS_FILE")
_clients: dict[tuple, fsspec.AbstractFileSystem] = {}


def _s3() -> fsspec.AbstractFileSystem:
    """The S3 filesystem for the current environment. A new client costs ~0.1-0.3 s, so one
    is kept per process, thread, endpoint, credential source and retry window (fsspec's own
    cache keys on the constructor's arguments, which no longer include the credentials). The
    key holds a digest of the sources, not the sources."""
    from enat.pipelines.s3_retry import RetryingS3FileSystem, retry_seconds

    env = os.environ
    sources = [env.get(name, "") for name in _CREDENTIAL_SOURCES]
    with contextlib.suppress(OSError):
        sources.append(str(os.stat(env.get("AWS_SHARED_CREDENTIALS_FILE", "")).st_mtime_ns))
    window = retry_seconds()
    key = (os.getpid(), threading.get_ident(), env.get("AWS_ENDPOINT_URL", ""),
           hashlib.sha256("\0".join(sources).encode()).hexdigest(), window)
    if key not in _clients:
        options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True,
                                   "retry_seconds": window}
        if env.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = env["AWS_ENDPOINT_URL"]
        _clients[key] = RetryingS3FileSystem(**options)
    return _clients[key]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`."""
    if url.startswith("s3://"):
        fs = _s3()
        return fs, fs._strip_protocol(url)
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else os.path.join(url, *parts)


def _unprotocol(fs: fsspec.AbstractFileSystem, url: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return url if protocol == "file" else f"{protocol}://{url}"


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Full URLs of the entries directly under `url` (temporary keys excluded)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = fs.ls(path, detail=False)
    return sorted(_unprotocol(fs, n) for n in names if posixpath.basename(n.rstrip("/")) != TMP_DIR)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def open_file(url: str, mode: str = "rb") -> IO:
    """Open for reading (writes go through `atomic_write`)."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


def _tmp_url(url: str) -> str:
    parent, name = posixpath.split(url.rstrip("/")) if "://" in url else os.path.split(url)
    return join(parent, TMP_DIR, f"{uuid.uuid4().hex[:12]}-{name}")


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary key and move it to `url` only if the block completes."""
    fs, path = filesystem(url)
    tmp = _tmp_url(path)
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException as err:
        # A store that stayed unreachable for the whole retry window is not asked again (it
        # would only delay the error): the next run's remove_temporaries deletes the key.
        if not isinstance(err, StorageUnreachable):
            with contextlib.suppress(Exception):
                fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as handle:
        handle.write(data)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def remove_temporaries(url: str) -> int:
    """Delete temporary keys left under `url` by interrupted writes; returns how many."""
    fs, path = filesystem(url)
    stale = [p for p in fs.find(path) if f"/{TMP_DIR}/" in p] if fs.exists(path) else []
    for item in stale:
        fs.rm(item)
    return len(stale)


def ensure_bucket(url: str) -> None:
    """Create the bucket of an s3:// URL if needed (a no-op for local paths)."""
    fs, path = filesystem(url)
    if url.startswith("s3://"):
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    else:
        fs.makedirs(path, exist_ok=True)


def check_writable(url: str) -> None:
    """Fail fast, before any work, if `url` cannot be written (bad credentials, no bucket)."""
    probe = join(url, TMP_DIR, f"probe-{uuid.uuid4().hex[:8]}")
    try:
        if url.startswith("s3://"):
            fs, path = filesystem(url)
            bucket = path.split("/", 1)[0]
            fs.ls(bucket)  # some servers create a missing bucket on write: be explicit
        write_bytes(probe, b"ok")
        remove(probe)
    except PermissionError as err:
        raise StorageError(f"no permission to write {url}: check the credentials (AWS_PROFILE and "
                           f"AWS_SHARED_CREDENTIALS_FILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
                           f"({err.__class__.__name__})") from None
    except FileNotFoundError:
        raise StorageError(f"cannot write {url}: the bucket or folder does not exist (create "
                           f"it, or run `enat services up` for the local bucket)") from None
    except OSError as err:
        raise StorageError(f"cannot write {url}: {err}") from None
