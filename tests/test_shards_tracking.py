"""The shard/manifest format and the MLflow tracker."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import tarfile

import numpy as np
import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from enat.pipelines import storage
from enat.pipelines.shards import (
    Manifest,
    ManifestMismatch,
    TokenSample,
    check_compatible,
    decode_sample,
    encode_sample,
    read_manifest,
    shard_bytes,
    write_manifest,
    write_shard,
)
from enat.pipelines.tracking import Tracker, flatten


def sample(i: int, text: bool = False) -> TokenSample:
    rng = np.random.default_rng(i)
    return TokenSample(
        key=f"{i:08d}", tokens=rng.integers(0, 1024, (4, 4)).astype(np.uint16),
        flip_tokens=rng.integers(0, 1024, (4, 4)).astype(np.uint16),
        label=None if text else i % 3, caption=f"caption {i}" if text else None,
        text=rng.normal(size=(6, 8)).astype(np.float16) if text else None,
        text_mask=np.arange(6) < 4 if text else None, meta={"source": f"img{i}.png"})


@pytest.mark.parametrize("text", [False, True])
def test_shard_round_trip_through_webdataset_on_s3(s3_bucket, text):
    samples = [sample(i, text) for i in range(5)]
    url = storage.join(s3_bucket, "train", "shard-000000.tar")
    entry = write_shard(url, samples)
    assert entry["count"] == 5
    assert entry["sha256"] == hashlib.sha256(storage.read_bytes(url)).hexdigest()
    assert shard_bytes(samples) == storage.read_bytes(url)  # deterministic bytes
    # Read back as training does (trainer/data.py): the shard's bytes from storage through
    # WebDataset's tar iterators.
    stream = [{"url": url, "stream": io.BytesIO(storage.read_bytes(url))}]
    decoded = [decode_sample(raw) for raw in group_by_keys(tar_file_expander(stream))]
    for original, back in zip(samples, decoded, strict=True):
        assert back.key == original.key and back.tokens.dtype == np.uint16
        np.testing.assert_array_equal(back.tokens, original.tokens)
        np.testing.assert_array_equal(back.flip_tokens, original.flip_tokens)
        assert back.label == original.label and back.caption == original.caption
        if text:
            np.testing.assert_array_equal(back.text, original.text)
            np.testing.assert_array_equal(back.text_mask, original.text_mask)


def test_shards_are_the_bytes_tarfile_and_np_save_write():
    """Shard tars and their .npy members are formatted by enat's own fast path: byte for
    byte what tarfile (USTAR) and np.save write, for keys of every length ustar handles
    (non-ASCII, exactly 100 bytes with the extension, split into prefix and name) and for
    arrays that are not C-contiguous."""
    samples = [sample(i, text=i % 2 == 1) for i in range(6)]
    keys = ["a", "ü" * 40, "k" * 84, "x" * 150 + "/y", "z/" * 60 + "q", "7"]
    for one, key in zip(samples, keys, strict=True):
        one.key = key
    samples[5].tokens = np.asfortranarray(samples[5].tokens.astype(np.uint16))
    samples[5].flip_tokens = samples[5].flip_tokens[:, ::2]
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for one in samples:
            for extension, data in encode_sample(one).items():
                info = tarfile.TarInfo(f"{one.key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    assert shard_bytes(samples) == reference.getvalue()
    for one in samples:
        for extension, array in (("tokens.npy", one.tokens), ("flip.tokens.npy", one.flip_tokens)):
            saved = io.BytesIO()
            np.save(saved, array.astype(np.uint16), allow_pickle=False)
            assert encode_sample(one)[extension] == saved.getvalue()


def test_manifest_round_trip_and_compatibility(tmp_path):
    manifest = Manifest(tokenizer_id="vqgan-abc", tokenizer_sha256="0" * 64, resolution=32,
                        grid=[8, 8], codebook_size=256, classes=["a", "b"],
                        splits={"train": [{"name": "shard-000000.tar", "count": 3, "sha256": "x"}]})
    write_manifest(str(tmp_path), manifest)
    back = read_manifest(str(tmp_path))
    assert back == manifest and back.num_samples() == 3
    assert back.shard_urls(str(tmp_path)) == [str(tmp_path / "train" / "shard-000000.tar")]
    check_compatible(back, 256, (8, 8), "vqgan-abc")
    with pytest.raises(ManifestMismatch, match="codebook 256 != model's 1024"):
        check_compatible(back, 1024, (8, 8))
    with pytest.raises(ManifestMismatch, match="tokenizer 'vqgan-abc' != expected 'other'"):
        check_compatible(back, 256, (8, 8), "other")
    with pytest.raises(FileNotFoundError, match="pretokenize the data first"):
        read_manifest(str(tmp_path / "missing"))


def test_tracker_logs_to_sqlite_and_filters_secrets(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tracker = Tracker("tests", "run-1")
    tracker.log_params({"lr": 0.1, "storage": {"secret_key": "S3CRET", "root": "s3://b"}})
    tracker.log_metrics({"loss": 1.5}, step=3)
    tracker.set_tags({"checkpoint": "s3://b/c"})
    tracker.finish()
    assert tracker.active
    with sqlite3.connect(db) as con:
        params = dict(con.execute("select key, value from params").fetchall())
        metrics = con.execute("select key, value, step from metrics").fetchall()
    assert params == {"lr": "0.1", "storage.root": "s3://b"}
    assert metrics == [("loss", 1.5, 3)]
    assert "S3CRET" not in db.read_bytes().decode(errors="ignore")
    assert flatten({"a": {"password": 1, "b": 2}}) == {"a.b": "2"}


def test_unreachable_tracking_buffers_and_finish_says_what_was_lost(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker("tests", "run-2")
    tracker.log_metrics({"loss": 1.0}, step=1)  # no exception, no wait
    assert tracker.active and tracker.run_id is None  # the run is created once MLflow answers
    assert not tracker.finish(timeout=0.5)
    err = capsys.readouterr().err
    assert "warning: MLflow unreachable" in err
    assert "MLflow did not take 1 run, 1 metrics, 1 status (metrics of steps 1-1) within 0.5 s" in err
