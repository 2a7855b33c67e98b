"""One way to reach storage: s3://, file:// and plain paths through fsspec.

The S3 endpoint comes from the environment (AWS_ENDPOINT_URL), never from configs.
Credentials are never handed to s3fs: botocore finds them in each process (an
AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE, as `enat services` sets them, an instance
profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), so a pickled filesystem (Ray Tune
pickles its storage filesystem into the experiment folder) carries the endpoint only.
Objects are published atomically: written under a temporary key in a `_tmp/` folder beside the target, then
moved into place, so a reader never sees half an object. A crash leaves only temporary
keys, which `remove_temporaries` deletes on the next run. Small objects can also be
written conditionally (`write_if`, `remove_if`: only if unchanged since read), what a lease
(pipelines/lease.py) is made of.
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
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from fsspec.asyn import sync
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

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


# -- conditional writes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tagged:
    data: bytes
    tag: str  # changes with every write: the S3 ETag, or the sha256 of a local file


def read_tagged(url: str) -> Tagged | None:
    """A small object and its tag, from one read; None when there is none."""
    fs, path = _conditional_fs(url)
    if not isinstance(fs, LocalFileSystem):
        try:
            return sync(fs.loop, _get_tagged, fs, *fs.split_path(path)[:2])
        except FileNotFoundError:
            return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    return Tagged(data, hashlib.sha256(data).hexdigest())


async def _get_tagged(fs: Any, bucket: str, key: str) -> Tagged:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return Tagged(await response["Body"].read(), response["ETag"])
    finally:
        response["Body"].close()


def write_if(url: str, data: bytes, tag: str | None) -> str | None:
    """Write a small object only if it is as the caller last read it: absent (`tag` None) or
    unchanged (its tag). Returns the new tag, or None when the object had changed.

    S3: one PUT with `If-None-Match: *` or `If-Match: <etag>`, decided by the server (SeaweedFS
    4.48 let two concurrent If-Match writes of one ETag both succeed: callers that need one
    winner read back, as pipelines/lease.py does); on a server that ignores those headers
    (`honours_conditions`) the check is a read before the write, which another writer can
    slip between. Local files: checked and replaced (a temporary file, then a rename) under
    an exclusive lock."""
    fs, path = _conditional_fs(url)
    if isinstance(fs, LocalFileSystem):
        with _locked(path):
            if _current_tag(url) != tag:
                return None
            temporary = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
            return hashlib.sha256(data).hexdigest()
    response = _s3_call_if(fs, path, url, "put_object", tag, Body=data)
    return None if response is None else response["ETag"]


def remove_if(url: str, tag: str) -> bool:
    """Delete an object only if it still has `tag` (S3: `If-Match`); False if it changed or is gone."""
    fs, path = _conditional_fs(url)
    if isinstance(fs, LocalFileSystem):
        with _locked(path):
            if _current_tag(url) != tag:
                return False
            os.remove(path)
            return True
    return _s3_call_if(fs, path, url, "delete_object", tag) is not None


def _s3_call_if(fs: Any, path: str, url: str, method: str, tag: str | None, **arguments: Any) -> Any:
    """One S3 request made only if the object is as the caller read it: absent (`tag` None)
    or unchanged (its tag). Its response, or None when the object had changed. The server
    decides (If-None-Match / If-Match) where it honours those headers; elsewhere a read just
    before the request is the check, which another writer can slip between."""
    if honours_conditions(url):
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
    elif _current_tag(url) != tag:
        return None
    else:
        condition = {}
    bucket, key, _ = fs.split_path(path)
    try:
        return fs.call_s3(method, Bucket=bucket, Key=key, **arguments, **condition)
    except OSError as err:
        if _condition_refused(err):
            return None
        raise


_honoured: dict[tuple[str, str], bool] = {}


def honours_conditions(url: str) -> bool:
    """Whether the store behind `url` decides conditional writes itself. Local files do (see
    write_if). An S3 server is asked once per process, endpoint and bucket, with a probe key:
    a second `If-None-Match: *` create, an `If-Match` PUT and an `If-Match` DELETE with a
    wrong ETag must all be refused (S3-compatible servers that predate these headers
    ignore them and write)."""
    fs, path = _conditional_fs(url)
    if isinstance(fs, LocalFileSystem):
        return True
    bucket = path.split("/", 1)[0]
    cache_key = (os.environ.get("AWS_ENDPOINT_URL", ""), bucket)
    if cache_key not in _honoured:
        probe = posixpath.join(posixpath.dirname(path.split("/", 1)[1]), TMP_DIR,
                               f"conditions-{uuid.uuid4().hex[:12]}")
        wrong = '"00000000000000000000000000000000"'
        attempts = [("put_object", {"Body": b"1", "IfNoneMatch": "*"}),
                    ("put_object", {"Body": b"2", "IfMatch": wrong}),
                    ("delete_object", {"IfMatch": wrong})]
        fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"0")
        refused = []
        try:
            for method, arguments in attempts:
                try:
                    fs.call_s3(method, Bucket=bucket, Key=probe, **arguments)
                    refused.append(False)
                except OSError as err:
                    if not _condition_refused(err) and _status(err) != 501:  # 501: not implemented
                        raise
                    refused.append(_condition_refused(err))
        finally:
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)
        _honoured[cache_key] = all(refused)
    return _honoured[cache_key]


def _conditional_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = filesystem(url)
    if not (url.startswith("s3://") or isinstance(fs, LocalFileSystem)):
        raise StorageError(f"{url}: conditional writes need an s3:// URL or a local path")
    return fs, path


def _current_tag(url: str) -> str | None:
    current = read_tagged(url)
    return current.tag if current is not None else None


def _condition_refused(err: OSError) -> bool:
    """An S3 error that means "the object is not as you said": 412 Precondition Failed
    (s3fs raises FileExistsError for If-None-Match), 409 when a concurrent conditional
    write won, 404 for If-Match on a missing key."""
    return isinstance(err, (FileExistsError, FileNotFoundError)) or _status(err) in (409, 412)


def _status(err: OSError) -> int | None:
    """The HTTP status of the S3 response behind an error s3fs translated."""
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on `<path>.lock`, an empty file kept beside it: local conditional
    writers of `path` take turns (closing the file releases the lock)."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
