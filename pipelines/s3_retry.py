"""The S3 filesystem enat uses: s3fs that rides out an outage of the store for a while.

Three layers retry, each for what it is good at:
- botocore, configured through s3fs's `config_kwargs`, in "standard" mode (AWS's
  recommended one): 3 attempts in all with jittered exponential backoff, ~1-3 s, for
  throttling codes, 500/502/503/504, connection errors and timeouts (s3fs's connect and
  read timeouts, 5 s and 15 s, turn a store that hangs into a timeout). The default
  "legacy" mode knows fewer throttling codes; "adaptive" adds client-side rate limiting
  that botocore still calls experimental.
- s3fs retries its own short list (read timeouts, bodies cut off mid-read) 5 times,
  re-issuing the GET of a body that broke off.
- Both count attempts, so a store that refuses connections for 15 s (a restart) outlasts
  them within seconds. `RetryingS3FileSystem._call_s3`, the one call every s3fs operation
  makes per S3 request (reads, listings, writes, multipart parts, copies, deletes), keeps
  retrying transient failures with backoff until a time window has passed
  (ENAT_STORAGE_RETRY_SECONDS, default 120), then raises StorageUnreachable: one line naming
  the endpoint and the object, a UserError. The window bounds when the last attempt
  starts; a store that accepts connections and never answers can hold that attempt for
  the layers' timeouts, and the line gives the time actually waited.

Only transient failures are retried: connections refused, reset or timed out, 500/502/503/504
and throttling. Refused credentials (403), missing objects (404) and bad requests fail at once.
Each request is retried as a whole, and every request enat makes is idempotent (a GET of
the same bytes, a PUT of the same object or part, a copy from a temporary key that is still
there, a delete), so a retried read returns the same bytes and a retried write publishes
the same object.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from typing import Any

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.asyn import sync_wrapper
from s3fs import S3FileSystem

from enat.pipelines.outbox import Backoff
from enat.pipelines.storage import StorageError, StorageUnreachable

RETRY_SECONDS_VARIABLE = "ENAT_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
FIRST_DELAY, MAX_DELAY = 0.5, 5.0  # seconds between our attempts: doubling, then capped

# What botocore's standard mode treats as transient too: server errors, throttling (S3 says
# SlowDown with a 503, some S3-compatible stores 429) and request timeouts.
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
                    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"}


def retry_seconds() -> float:
    """The retry window from the environment; a bad value is a one-line error."""
    text = os.environ.get(RETRY_SECONDS_VARIABLE, "")
    try:
        value = float(text) if text.strip() else DEFAULT_RETRY_SECONDS
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise StorageError(f"{RETRY_SECONDS_VARIABLE}={text!r}: expected a number of seconds >= 0 "
                           f"(how long to retry an unreachable store; default {DEFAULT_RETRY_SECONDS:.0f})")
    return value


def is_transient(err: BaseException) -> bool:
    """Whether `err` is worth retrying: the store or the way to it failed, not the request.
    s3fs turns a ClientError into an OSError (PermissionError, FileNotFoundError, ...) whose
    cause is the ClientError, so the chain of causes is read, first recognised link wins."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, ClientError):
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = err.response.get("Error", {}).get("Code", "")
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
        if isinstance(err, SSLError):
            return False  # a certificate that does not verify stays that way
        if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, ConnectionError,
                            TimeoutError)):
            return True
        err, seen = err.__cause__, seen + 1
    return False


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {lines[0]}" if lines else err.__class__.__name__


def _activity(method: str, kwargs: dict[str, Any]) -> str:
    """`reading s3://bucket/key` for a call like get_object(Bucket=..., Key=...). s3fs checks
    that the bucket exists before it writes an object (head_bucket, get_bucket_location)."""
    verb = ("checking" if method in ("head_bucket", "get_bucket_location")
            else "reading" if method.startswith(("get_", "head_"))
            else "listing" if method.startswith("list_")
            else "deleting" if method.startswith(("delete_", "abort_")) else "writing")
    where = kwargs.get("Key") or kwargs.get("Prefix") or ""
    return f"{verb} s3://{kwargs.get('Bucket', '')}/{where}".rstrip("/")


# Endpoints (None: AWS's own) whose retry window ran out, and since when they fail. Every
# call runs on fsspec's one event-loop thread, so no lock is needed.
_unreachable_since: dict[str | None, float] = {}


class RetryingS3FileSystem(S3FileSystem):
    """s3fs whose every S3 request is retried for `retry_seconds` while the failure is
    transient. Pickles like s3fs (Ray Tune pickles it): endpoint and window, no credentials."""

    def __init__(self, *args: Any, retry_seconds: float = DEFAULT_RETRY_SECONDS, **kwargs: Any):
        # A new dict each time: botocore rewrites the one it is given.
        kwargs.setdefault("config_kwargs", {"retries": {"total_max_attempts": 3, "mode": "standard"}})
        super().__init__(*args, **kwargs)
        self.retry_seconds = retry_seconds

    def _endpoint(self) -> str:
        client = self._s3
        return self.endpoint_url or (client.meta.endpoint_url if client is not None else "S3")

    async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        started, backoff, retries = time.monotonic(), Backoff(FIRST_DELAY, MAX_DELAY), 0
        # Once a window has run out, later calls make one attempt each: s3fs probes a bucket
        # twice (and swallows the errors) before it creates it, and each would wait again.
        since = _unreachable_since.get(self.endpoint_url, started)
        deadline = started if self.endpoint_url in _unreachable_since else started + self.retry_seconds
        while True:
            try:
                result = await super()._call_s3(method, *akwarglist, **kwargs)
            except Exception as err:
                if not is_transient(err):
                    # The storage answered (often a 404: s3fs asks for a "folder" as a key
                    # first), so it is back, and the wait is reported as any other's.
                    self._reachable_again(started, retries, method, kwargs)
                    raise
                now = time.monotonic()
                if now >= deadline:
                    _unreachable_since[self.endpoint_url] = since
                    raise StorageUnreachable(
                        f"storage at {self._endpoint()} unreachable for {now - since:.0f} s while "
                        f"{_activity(method, kwargs)}: {_describe(err)}; rerun the same command "
                        f"to resume") from err
                if retries == 0:
                    print(f"warning: storage at {self._endpoint()} unreachable while "
                          f"{_activity(method, kwargs)} ({_describe(err)}); retrying for up to "
                          f"{self.retry_seconds:g} s", file=sys.stderr, flush=True)
                retries += 1
                # Jittered, so that many workers do not all return at the same instant; the
                # last attempt is made at the end of the window.
                await asyncio.sleep(min(backoff.next() * random.uniform(0.5, 1.0), deadline - now))
                continue
            self._reachable_again(started, retries, method, kwargs)
            return result

    def _reachable_again(self, started: float, retries: int, method: str, kwargs: dict[str, Any]) -> None:
        _unreachable_since.pop(self.endpoint_url, None)
        if retries:
            print(f"note: storage at {self._endpoint()} reachable again after "
                  f"{time.monotonic() - started:.1f} s ({retries} retries) while "
                  f"{_activity(method, kwargs)}", file=sys.stderr, flush=True)

    # s3fs binds its synchronous call_s3 (which S3File uses for every write) to its own
    # _call_s3 function, so it is bound again here to reach the retrying one.
    call_s3 = sync_wrapper(_call_s3)
