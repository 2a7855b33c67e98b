"""Storage through fsspec on a real SeaweedFS server and on local paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines import storage


def test_write_read_list_on_s3(s3_bucket):
    url = storage.join(s3_bucket, "dir", "hello.txt")
    storage.write_bytes(url, b"hello world")
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"hello world"
    assert storage.listdir(storage.join(s3_bucket, "dir")) == [url]
    storage.remove(url)
    assert not storage.exists(url)


def test_plain_s3fs_round_trip_with_real_credentials(s3_env, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(key=s3_env.access_key, secret=s3_env.secret_key,
                           endpoint_url=s3_env.url)
    path = s3_bucket[len("s3://"):] + "/plain.bin"
    fs.pipe(path, b"\x00\x01\x02")
    assert fs.cat(path) == b"\x00\x01\x02"


def test_wrong_secret_is_refused(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match="no permission"):
        storage.check_writable(s3_bucket)
    with pytest.raises(PermissionError):
        storage.read_bytes(storage.join(s3_bucket, "anything"))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_failure_inside_atomic_write_leaves_no_object(where, s3_bucket, tmp_path):
    root = s3_bucket if where == "s3" else str(tmp_path)
    url = storage.join(root, "shard.tar")
    with pytest.raises(RuntimeError), storage.atomic_write(url) as handle:
        handle.write(b"half a shard")
        raise RuntimeError("crash before publish")
    assert not storage.exists(url)
    assert storage.listdir(root) == []


CRASHING_WRITER = """
import os, sys
from pipelines import storage
with storage.atomic_write(sys.argv[1]) as handle:
    handle.write(b"x" * 100_000)
    handle.flush()
    os._exit(9)  # the process dies between writing and publishing
"""


@pytest.mark.parametrize("where", ["s3", "local"])
def test_killed_writer_leaves_no_visible_object_and_cleanup_removes_temporaries(
    where, s3_bucket, tmp_path
):
    root = s3_bucket if where == "s3" else str(tmp_path)
    url = storage.join(root, "out", "shard-000000.tar")
    storage.write_bytes(storage.join(root, "out", "keep.txt"), b"published")
    result = subprocess.run([sys.executable, "-c", CRASHING_WRITER, url], capture_output=True)
    assert result.returncode == 9
    assert not storage.exists(url)
    assert storage.listdir(storage.join(root, "out")) == [storage.join(root, "out", "keep.txt")]
    storage.remove_temporaries(storage.join(root, "out"))
    assert storage.remove_temporaries(storage.join(root, "out")) == 0
    assert storage.read_bytes(storage.join(root, "out", "keep.txt")) == b"published"


def test_webdataset_reads_s3_through_registered_handler(s3_bucket):
    import io
    import tarfile

    import webdataset as wds

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(key.encode()))
    url = storage.join(s3_bucket, "wds", "shard-000000.tar")
    storage.write_bytes(url, buffer.getvalue())
    storage.register_webdataset_s3()
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["txt"] for s in samples] == [b"a", b"b"]


def test_missing_bucket_fails_fast(s3_env):
    with pytest.raises(storage.StorageError):
        storage.check_writable("s3://no-such-bucket-enat/x")
