"""Storage through fsspec on a real SeaweedFS server and on local paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from enat.pipelines import storage


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
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)  # keys in the env win over the file
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
from enat.pipelines import storage
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


def test_missing_bucket_fails_fast(s3_env):
    with pytest.raises(storage.StorageError):
        storage.check_writable("s3://no-such-bucket-enat/x")


def test_a_pickled_filesystem_carries_the_endpoint_but_no_credentials(s3_env, s3_bucket):
    """Ray Tune pickles its storage filesystem into the experiment folder (on the bucket)."""
    import pickle

    fs, _ = storage.filesystem(s3_bucket)
    data = pickle.dumps(fs)
    assert s3_env.secret_key.encode() not in data and s3_env.access_key.encode() not in data
    copy = pickle.loads(data)  # resolves the credentials again, from the environment's file
    path = s3_bucket[len("s3://"):] + "/pickled.bin"
    copy.pipe(path, b"ok")
    assert storage.read_bytes(f"{s3_bucket}/pickled.bin") == b"ok"


def test_keys_in_the_environment_move_to_a_private_file_before_ray_starts(s3_keys_in_env, s3_bucket,
                                                                         monkeypatch):
    from enat.cluster.ray_session import hide_credential_keys

    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        monkeypatch.setenv(name, "")  # restored after the test
    path = hide_credential_keys()
    assert path and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert s3_keys_in_env.secret_key not in "".join(os.environ.values())
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == path
    storage.write_bytes(f"{s3_bucket}/moved.bin", b"still reachable")  # botocore reads the file
    assert storage.read_bytes(f"{s3_bucket}/moved.bin") == b"still reachable"
    assert hide_credential_keys() is None  # nothing left to move
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "half-a-pair")  # no key id: dropped, not kept
    assert hide_credential_keys() is None and "AWS_SECRET_ACCESS_KEY" not in os.environ
