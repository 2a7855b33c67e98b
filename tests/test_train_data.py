"""Training data: manifest checks, one global sample order whatever the world size or reader
count, exact resumption on another number of workers, mirrored copies, and replacing the
samples of corrupt shards (local folders and the SeaweedFS fixture)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from enat.models.config import ENATConfig
from enat.pipelines import storage
from enat.pipelines.shards import ManifestMismatch, read_manifest, write_manifest
from enat.trainer.data import DataConfig, MissingShards, TokenStream, open_dataset
from enat.trainer.synthetic import SyntheticSpec, make_samples, write_synthetic_shards

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
    samples = make_samples(spec)
    plain = {s.tokens.astype(np.uint16).reshape(-1).tobytes() for s in samples}
    flipped = {s.flip_tokens.astype(np.uint16).reshape(-1).tobytes() for s in samples}
    return plain, flipped


def global_batches(dataset, config, world: int, steps: int, start: int = 0, batch_size: int = 2,
                   global_batch: int = 8) -> list[bytes]:
    """The first `steps` global batches as W ranks take them, put back together in rank order."""
    accum = global_batch // (batch_size * world)
    streams = [TokenStream(dataset, config, batch_size, seed=3, rank=r, world_size=world, grad_accum=accum,
                           start=start) for r in range(world)]
    out = []
    for _ in range(steps):
        for stream in streams:
            out += keys_of(stream, accum)
    assert all(s.position() == start + steps * global_batch for s in streams)
    for stream in streams:
        stream.close()
    return out


@pytest.mark.parametrize("per_shard", [16, 48])  # 6 shards, 2 shards
def test_the_global_batch_sequence_is_the_same_for_any_world_size_and_reader_count(tmp_path, per_shard):
    url = str(tmp_path / "data")
    write_synthetic_shards(url, replace(SPEC, per_shard=per_shard))
    config = DataConfig(url=url, readers=2, shuffle_window=20, prefetch=6)
    dataset = open_dataset(config, MODEL)
    steps = 40  # 320 samples: three epochs and a third
    reference = global_batches(dataset, config, world=1, steps=steps)
    for world, readers in ((2, 1), (4, 3), (1, 4)):
        assert global_batches(dataset, replace(config, readers=readers), world, steps) == reference

    # Every epoch holds every sample once (in its plain or mirrored form), in a new order.
    index = {}
    for number, sample in enumerate(make_samples(SPEC)):
        index[sample.tokens.astype(np.uint16).tobytes()] = number
        index[sample.flip_tokens.astype(np.uint16).tobytes()] = number
    assert len(set(index.values())) == 96 and len(index) >= 190  # grids identify their sample
    epochs = [[index[key] for key in reference[96 * e: 96 * (e + 1)]] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(96))
    assert epochs[0] != epochs[1] != epochs[2]
    assert config.shuffle_window < 96 and max(epochs[0][:20]) < 96  # windowed, still a permutation


def test_a_resumed_stream_continues_on_another_world_size_exactly(shards):
    config = DataConfig(url=shards, readers=2, shuffle_window=10)
    dataset = open_dataset(config, MODEL)
    straight = global_batches(dataset, config, world=2, steps=30)
    for stop, world in ((5, 1), (11, 4), (17, 2)):  # mid-epoch (epochs are 12 steps)
        before = global_batches(dataset, config, world=2, steps=stop)
        after = global_batches(dataset, config, world=world, steps=30 - stop, start=stop * 8)
        assert before + after == straight  # nothing repeated, nothing skipped
    other_seed = TokenStream(dataset, config, batch_size=8, seed=4, rank=0, world_size=1)
    assert keys_of(other_seed, 3) != straight[:24]
    other_seed.close()


def test_mirrored_copy_is_picked_at_random_and_labels_pass_through(shards):
    config = DataConfig(url=shards, readers=1, shuffle_window=4, flip_prob=0.5)
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
def test_samples_of_corrupt_shards_are_replaced_and_counted(where, tmp_path, s3_bucket, capsys):
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

    config = DataConfig(url=url, readers=2, shuffle_window=4)
    stream = TokenStream(open_dataset(config, MODEL), config, batch_size=16, seed=0, rank=0, world_size=1)
    for _ in range(12):  # two epochs
        batch = next(stream)
        assert batch.ids.shape == (16, 16)
    stats = stream.stats()
    stream.close()
    assert stats.corrupt_shards >= 2
    err = capsys.readouterr().err
    assert "shard-000001.tar does not match its manifest sha256, its samples are replaced" in err
    assert "shard-000002.tar is unreadable after" in err


def test_a_corrupt_sample_is_replaced(tmp_path, capsys):
    from enat.pipelines.shards import TokenSample, write_shard

    url = str(tmp_path / "data")
    manifest = write_synthetic_shards(url, replace(SPEC, samples=32))
    wrong = TokenSample(key="bad", tokens=np.full((4, 4), 999, np.uint16), label=1)  # id >= codebook
    entry = write_shard(storage.join(url, "train", "shard-000002.tar"), [wrong])
    manifest.splits["train"].append(entry)
    write_manifest(url, manifest)
    config = DataConfig(url=url, readers=1, shuffle_window=1)
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

    config = DataConfig(url=shards, readers=2, shuffle_window=4)
    dataset = open_dataset(config, MODEL)
    monkeypatch.setattr(data.storage, "read_bytes", unreachable)  # the outage begins
    stream = TokenStream(dataset, config, batch_size=4, seed=0, rank=0, world_size=1)
    with pytest.raises(storage.StorageUnreachable) as raised:
        next(stream)
    stream.close()
    assert str(raised.value) == line and stream.stats().missing_shards == 0
