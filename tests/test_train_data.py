"""Training data: manifest checks, the per-rank/per-reader split, shuffling, mirrored copies,
resumable positions, and skipping corrupt shards (local folders and the SeaweedFS fixture)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from enat.models.config import ENATConfig
from enat.pipelines import storage
from enat.pipelines.shards import ManifestMismatch, read_manifest, write_manifest
from enat.trainer.data import (
    DataConfig,
    MissingShards,
    Reader,
    ReaderPosition,
    StreamPosition,
    TokenStream,
    open_dataset,
)
from enat.trainer.synthetic import SyntheticSpec, write_synthetic_shards

MODEL = ENATConfig(codebook_size=64, grid_size=4, width=32, heads=2, encoder_depth=1, decoder_depth=1,
                   num_classes=5)
SPEC = SyntheticSpec(grid=4, codebook_size=64, num_classes=5, samples=96, per_shard=16)


@pytest.fixture
def shards(tmp_path) -> str:
    url = str(tmp_path / "data")
    write_synthetic_shards(url, SPEC)
    return url


def keys_of(stream: TokenStream, batches: int) -> list[str]:
    """Sample identities (the token grids as bytes) of the next `batches` batches."""
    out = []
    for _ in range(batches):
        batch = next(stream)
        out += [bytes(row.numpy().astype(np.uint16)) for row in batch.ids]
    return out


def original_grids(spec: SyntheticSpec) -> tuple[set[bytes], set[bytes]]:
    from enat.trainer.synthetic import make_samples

    samples = make_samples(spec)
    plain = {s.tokens.astype(np.uint16).reshape(-1).tobytes() for s in samples}
    flipped = {s.flip_tokens.astype(np.uint16).reshape(-1).tobytes() for s in samples}
    return plain, flipped


@pytest.mark.parametrize("per_shard", [16, 48])  # 6 shards (split by shard), 2 shards (by sample)
def test_ranks_and_readers_split_each_epoch_without_overlap(tmp_path, per_shard):
    url = str(tmp_path / "data")
    write_synthetic_shards(url, replace(SPEC, per_shard=per_shard))
    config = DataConfig(url=url, readers=2, shuffle_buffer=8)
    dataset = open_dataset(config, MODEL)
    epochs: dict[int, list[str]] = {0: [], 1: []}
    for slot in range(4):  # 2 ranks x 2 readers
        for sample, position in Reader(dataset, config, seed=3, slot=slot, slots=4, start=ReaderPosition()):
            if position.epoch > 1:
                break
            epochs[position.epoch].append(sample.key)
    expected = sorted(f"{i:08d}" for i in range(96))
    assert sorted(epochs[0]) == expected and sorted(epochs[1]) == expected
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_stream_is_deterministic_and_resumes_exactly(shards):
    config = DataConfig(url=shards, readers=2, shuffle_buffer=10)
    dataset = open_dataset(config, MODEL)
    straight = TokenStream(dataset, config, batch_size=5, seed=7, rank=1, world_size=2)
    first = keys_of(straight, 7)
    saved = StreamPosition.from_dict(json.loads(json.dumps(straight.position().to_dict())))
    rest = keys_of(straight, 20)  # crosses into the next epoch
    straight.close()
    assert {p.epoch for p in straight.position().positions} != {0}

    again = TokenStream(dataset, config, batch_size=5, seed=7, rank=1, world_size=2)
    assert keys_of(again, 7) == first
    again.close()
    resumed = TokenStream(dataset, config, batch_size=5, seed=7, rank=1, world_size=2, resume=saved)
    assert keys_of(resumed, 20) == rest
    resumed.close()
    other_seed = TokenStream(dataset, config, batch_size=5, seed=8, rank=1, world_size=2)
    assert keys_of(other_seed, 7) != first
    other_seed.close()


def test_mirrored_copy_is_picked_at_random_and_labels_pass_through(shards):
    config = DataConfig(url=shards, readers=1, shuffle_buffer=4, flip_prob=0.5)
    stream = TokenStream(open_dataset(config, MODEL), config, batch_size=48, seed=0, rank=0, world_size=1)
    batch = next(stream)
    stream.close()
    plain, flipped = original_grids(SPEC)
    rows = [bytes(r.numpy().astype(np.uint16)) for r in batch.ids]
    n_flipped = sum(r in flipped and r not in plain for r in rows)
    assert 10 <= n_flipped <= 38
    assert batch.ids.shape == (48, 16) and batch.cond.shape == (48,)
    assert batch.cond.min() >= 0 and batch.cond.max() < 5  # never the null class: no drop here


def test_text_batches_carry_embeddings_and_masks(tmp_path):
    spec = replace(SPEC, text_dim=12, text_len=6)
    url = str(tmp_path / "text")
    write_synthetic_shards(url, spec)
    model = replace(MODEL, context_dim=12, context_len=8)
    config = DataConfig(url=url, readers=1)
    stream = TokenStream(open_dataset(config, model), config, batch_size=4, seed=0, rank=0, world_size=1)
    context, mask = next(stream).cond
    stream.close()
    assert context.shape == (4, 6, 12) and mask.shape == (4, 6) and mask.dtype.is_floating_point is False
    assert mask[:, 0].all()
    with pytest.raises(ManifestMismatch, match="are 6x12, the model takes at most 8x16"):
        open_dataset(DataConfig(url=url), replace(model, context_dim=16))
    with pytest.raises(ManifestMismatch, match="hold class labels but the model is text-conditioned"):
        write_synthetic_shards(str(tmp_path / "cls"), SPEC)
        open_dataset(DataConfig(url=str(tmp_path / "cls")), model)


def test_manifest_mismatch_fails_fast(shards):
    with pytest.raises(ManifestMismatch, match="tokenizer 'synthetic-000000000000' != expected 'vqgan-abc'"):
        open_dataset(DataConfig(url=shards, tokenizer_id="vqgan-abc"), MODEL)
    with pytest.raises(ManifestMismatch, match="codebook 64 != model's 128"):
        open_dataset(DataConfig(url=shards), replace(MODEL, codebook_size=128))
    with pytest.raises(ManifestMismatch, match="token grid"):
        open_dataset(DataConfig(url=shards), replace(MODEL, grid_size=8))
    with pytest.raises(ManifestMismatch, match="5 classes, the model only 3"):
        open_dataset(DataConfig(url=shards), replace(MODEL, num_classes=3))
    with pytest.raises(ValueError, match="data.url is empty"):
        open_dataset(DataConfig(), MODEL)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_dataset(DataConfig(url=shards + "-nowhere"), MODEL)


def test_missing_shards_are_a_clear_error(shards):
    storage.remove(storage.join(shards, "train", "shard-000003.tar"))
    with pytest.raises(MissingShards, match="1 of 6 shards .* missing \\(first: shard-000003.tar\\)"):
        open_dataset(DataConfig(url=shards), MODEL)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_corrupt_shards_and_samples_are_skipped_and_counted(where, tmp_path, s3_bucket, capsys):
    url = storage.join(s3_bucket, "data") if where == "s3" else str(tmp_path / "data")
    write_synthetic_shards(url, SPEC)
    # Shard 1: bytes flipped in place (sha256 no longer matches the manifest).
    bad = storage.join(url, "train", "shard-000001.tar")
    data = bytearray(storage.read_bytes(bad))
    data[700:900] = b"\xff" * 200
    storage.write_bytes(bad, bytes(data))
    # Shard 2: truncated, and the manifest updated to match, so the tar itself is broken.
    import hashlib

    cut = storage.join(url, "train", "shard-000002.tar")
    short = storage.read_bytes(cut)[:3000]
    storage.write_bytes(cut, short)
    manifest = read_manifest(url)
    manifest.splits["train"][2]["sha256"] = hashlib.sha256(short).hexdigest()
    write_manifest(url, manifest)

    config = DataConfig(url=url, readers=2, shuffle_buffer=4)
    stream = TokenStream(open_dataset(config, MODEL), config, batch_size=16, seed=0, rank=0, world_size=1)
    for _ in range(12):  # two epochs of the readable samples
        batch = next(stream)
        assert batch.ids.shape == (16, 16)
    stats = stream.stats()
    stream.close()
    assert stats.corrupt_shards >= 2
    err = capsys.readouterr().err
    assert "shard-000001.tar does not match its manifest sha256, skipped" in err
    assert "shard-000002.tar is unreadable" in err


def test_corrupt_sample_is_skipped(tmp_path, capsys):
    from enat.pipelines.shards import TokenSample, write_shard

    url = str(tmp_path / "data")
    manifest = write_synthetic_shards(url, replace(SPEC, samples=32))
    wrong = TokenSample(key="bad", tokens=np.full((4, 4), 999, np.uint16), label=1)  # id >= codebook
    entry = write_shard(storage.join(url, "train", "shard-000002.tar"), [wrong])
    manifest.splits["train"].append(entry)
    write_manifest(url, manifest)
    config = DataConfig(url=url, readers=1, shuffle_buffer=1)
    stream = TokenStream(open_dataset(config, MODEL), config, batch_size=40, seed=0, rank=0, world_size=1)
    assert next(stream).ids.max() < 64
    assert stream.stats().corrupt_samples >= 1
    stream.close()
    assert "sample bad" in capsys.readouterr().err


def test_a_store_unreachable_past_the_retry_window_stops_the_stream_with_its_own_line(shards,
                                                                                      monkeypatch):
    """A reader thread's StorageUnreachable reaches the trainer as itself (the CLI prints it as
    one line), not wrapped, and is never taken for a missing shard to skip."""
    from enat.trainer import data

    line = "storage at http://127.0.0.1:8333 unreachable for 120 s while reading …; rerun the same command"

    def unreachable(url: str) -> bytes:
        raise storage.StorageUnreachable(line)

    config = DataConfig(url=shards, readers=2, shuffle_buffer=4)
    dataset = open_dataset(config, MODEL)
    monkeypatch.setattr(data.storage, "read_bytes", unreachable)  # the outage begins
    stream = TokenStream(dataset, config, batch_size=4, seed=0, rank=0, world_size=1)
    with pytest.raises(storage.StorageUnreachable) as raised:
        next(stream)
    stream.close()
    assert str(raised.value) == line and stream.stats().missing_shards == 0
