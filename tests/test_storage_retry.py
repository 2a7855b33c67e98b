"""Which storage errors are retried, and how the retry window behaves, without a server: s3fs's
own request call is replaced by a script of outcomes (pipelines/s3_retry.py wraps it)."""

from __future__ import annotations

import re

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    SSLError,
)
from s3fs import S3FileSystem
from s3fs.errors import translate_boto_error

from enat.pipelines import s3_retry, storage
from enat.pipelines.s3_retry import RetryingS3FileSystem, is_transient

ENDPOINT = "http://127.0.0.1:8333"


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


TRANSIENT = [
    EndpointConnectionError(endpoint_url=ENDPOINT),  # connection refused
    ConnectTimeoutError(endpoint_url=ENDPOINT),
    ReadTimeoutError(endpoint_url=ENDPOINT),
    ConnectionClosedError(endpoint_url=ENDPOINT),
    ConnectionResetError(),
    TimeoutError(),
    client_error(500, "InternalError"),
    client_error(503, "SlowDown"),
    client_error(503, "ServiceUnavailable"),
    client_error(429, "TooManyRequests"),
    client_error(400, "RequestTimeout"),
    translate_boto_error(client_error(503, "SlowDown")),  # s3fs's OSError, caused by the ClientError
    translate_boto_error(client_error(502, "BadGateway")),
]
PERMANENT = [
    client_error(403, "AccessDenied"),
    client_error(404, "NoSuchKey"),
    client_error(404, "NoSuchBucket"),
    client_error(400, "InvalidArgument"),
    client_error(501, "NotImplemented"),
    translate_boto_error(client_error(403, "AccessDenied")),  # PermissionError
    translate_boto_error(client_error(404, "NoSuchKey")),  # FileNotFoundError
    FileNotFoundError("bucket/key"),
    SSLError(endpoint_url=ENDPOINT, error="certificate verify failed"),
    NoCredentialsError(),
    ParamValidationError(report="Invalid bucket name"),
    ValueError("bad input"),
]


@pytest.mark.parametrize("err", TRANSIENT, ids=lambda e: f"{type(e).__name__}-{e}"[:60])
def test_transient_errors_are_retried(err):
    assert is_transient(err)


@pytest.mark.parametrize("err", PERMANENT, ids=lambda e: f"{type(e).__name__}-{e}"[:60])
def test_refusals_and_bad_input_are_not(err):
    assert not is_transient(err)


class Script:
    """Stands in for s3fs's request call: raises the scripted errors in turn, then answers."""

    def __init__(self, *outcomes: BaseException | str):
        self.outcomes, self.calls = list(outcomes), []

    def answer(self, method: str) -> str:
        self.calls.append(method)
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def scripted(monkeypatch):
    """A retrying filesystem at ENDPOINT over a scripted request call, with short delays."""
    monkeypatch.setattr(s3_retry, "FIRST_DELAY", 0.01)
    monkeypatch.setattr(s3_retry, "MAX_DELAY", 0.05)
    monkeypatch.setattr(s3_retry, "_unreachable_since", {})

    def make(*outcomes: BaseException | str, window: float = 30.0) -> tuple[RetryingS3FileSystem, Script]:
        script = Script(*outcomes)

        async def call_s3(_fs, method, *_akwarglist, **_kwargs):
            return script.answer(method)

        monkeypatch.setattr(S3FileSystem, "_call_s3", call_s3)
        fs = RetryingS3FileSystem(endpoint_url=ENDPOINT, retry_seconds=window, skip_instance_cache=True)
        return fs, script

    return make


def test_a_short_outage_is_waited_out_and_reported(scripted, capsys):
    refused = EndpointConnectionError(endpoint_url=ENDPOINT)
    fs, script = scripted(refused, client_error(503, "SlowDown"), refused, "the bytes")
    # call_s3 is the synchronous path S3File takes for every write.
    assert fs.call_s3("put_object", Bucket="b", Key="runs/r/x.json", Body=b"{}") == "the bytes"
    assert script.calls == ["put_object"] * 4
    err = capsys.readouterr().err
    assert (f"warning: storage at {ENDPOINT} unreachable while writing s3://b/runs/r/x.json "
            f"(EndpointConnectionError: ") in err
    assert f"note: storage at {ENDPOINT} reachable again after " in err and "(3 retries)" in err


def test_an_outage_that_ends_in_a_refusal_is_reported_as_waited_out(scripted, capsys):
    # s3fs asks for a "folder" as a key first: once the storage is back, its answer is a 404.
    not_found = translate_boto_error(client_error(404, "NoSuchKey"))
    fs, script = scripted(EndpointConnectionError(endpoint_url=ENDPOINT), not_found)
    with pytest.raises(FileNotFoundError):
        fs.call_s3("head_object", Bucket="b", Key="runs/r/checkpoints")
    assert script.calls == ["head_object"] * 2
    err = capsys.readouterr().err
    assert f"note: storage at {ENDPOINT} reachable again after " in err
    assert "(1 retries) while reading s3://b/runs/r/checkpoints" in err


def test_refusals_fail_at_once(scripted):
    fs, script = scripted(translate_boto_error(client_error(403, "AccessDenied")))
    with pytest.raises(PermissionError):
        fs.call_s3("get_object", Bucket="b", Key="k")
    assert script.calls == ["get_object"]


def test_a_long_outage_ends_with_one_line_naming_the_endpoint(scripted):
    refused = EndpointConnectionError(endpoint_url=ENDPOINT)
    fs, script = scripted(*[refused] * 1000, window=0.3)
    with pytest.raises(storage.StorageUnreachable) as raised:
        fs.call_s3("get_object", Bucket="b", Key="data/train/shard-000003.tar")
    message = str(raised.value)
    assert re.fullmatch(f"storage at {re.escape(ENDPOINT)} unreachable for \\d+ s while reading "
                        f"s3://b/data/train/shard-000003.tar: EndpointConnectionError: [^\n]*; "
                        f"rerun the same command to resume", message), message
    assert isinstance(raised.value, storage.StorageError) and not isinstance(raised.value, OSError)
    assert len(script.calls) > 3  # retried within the window
    # Once the window has run out, the next call tries once (s3fs chains probes that would
    # each wait again), and a success ends that.
    tried = len(script.calls)
    with pytest.raises(storage.StorageUnreachable, match="while listing s3://b/runs"):
        fs.call_s3("list_objects_v2", Bucket="b", Prefix="runs")
    assert len(script.calls) == tried + 1
    script.outcomes = ["ok"]
    assert fs.call_s3("head_object", Bucket="b", Key="k") == "ok"
    script.outcomes = [refused, "ok"]  # back: a new outage gets a new window
    assert fs.call_s3("head_object", Bucket="b", Key="k") == "ok"


def test_the_window_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("ENAT_STORAGE_RETRY_SECONDS", "7.5")
    fs, _ = storage.filesystem("s3://b/k")
    assert isinstance(fs, RetryingS3FileSystem) and fs.retry_seconds == 7.5
    assert fs.config_kwargs["retries"]["mode"] == "standard"
    monkeypatch.delenv("ENAT_STORAGE_RETRY_SECONDS")
    assert storage.filesystem("s3://b/k")[0].retry_seconds == s3_retry.DEFAULT_RETRY_SECONDS
    monkeypatch.setenv("ENAT_STORAGE_RETRY_SECONDS", "two minutes")
    with pytest.raises(storage.StorageError, match="ENAT_STORAGE_RETRY_SECONDS='two minutes': expected"):
        storage.filesystem("s3://b/k")


def test_a_store_that_refuses_connections_through_the_real_client_stack(monkeypatch):
    """botocore and s3fs as they are, against a port nobody listens on: reads and writes end
    with the one line after the window (plus the last attempt's own retries)."""
    from enat.cluster.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")  # requests are signed before they fail
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    monkeypatch.setenv("ENAT_STORAGE_RETRY_SECONDS", "1")
    monkeypatch.setattr(s3_retry, "_unreachable_since", {})
    with pytest.raises(storage.StorageUnreachable,
                       match=f"^storage at {re.escape(endpoint)} unreachable for \\d+ s while reading "
                             f"s3://bucket/shard.tar: EndpointConnectionError"):
        storage.read_bytes("s3://bucket/shard.tar")
    with pytest.raises(storage.StorageUnreachable, match="rerun the same command to resume$"):
        storage.write_bytes("s3://bucket/runs/r/tracking.json", b"{}")
