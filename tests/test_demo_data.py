"""The emoji demo data: counts, classes, captions, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import list_emoji, make_demo_data


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".complete"}


def test_full_demo_data_counts_classes_and_captions(tmp_path):
    summary = make_demo_data(DemoDataConfig(out=str(tmp_path), cc3m_shard_size=500), progress=False)
    emoji = list_emoji()
    assert summary["images"] == len(emoji) > 1800
    classes = sorted(p.name for p in (tmp_path / "imagenet" / "train").iterdir())
    assert len(classes) == 10 and classes == sorted(summary["categories"])
    per_class = {c: len(list((tmp_path / "imagenet" / "train" / c).glob("*.png"))) for c in classes}
    assert per_class == summary["categories"]
    assert max(per_class.values()) > 10 * min(per_class.values())  # imbalanced, like real data

    tars = sorted((tmp_path / "cc3m").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(samples) == len(emoji)
    names = {e.name for e in emoji}
    for sample in samples[:50]:
        caption = sample["txt"].decode()
        meta = json.loads(sample["json"])
        assert caption in names and meta["caption"] == caption and meta["key"] == sample["__key__"]
        assert sample["jpg"][:2] == b"\xff\xd8"
    assert "grinning face" in {s["txt"].decode() for s in samples}


def test_demo_data_is_deterministic_and_resumes(tmp_path):
    config_a = DemoDataConfig(out=str(tmp_path / "a"), limit=40, cc3m_shard_size=16)
    config_b = DemoDataConfig(out=str(tmp_path / "b"), limit=40, cc3m_shard_size=16)
    make_demo_data(config_a, progress=False)
    make_demo_data(config_b, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    png = next((tmp_path / "a" / "imagenet").rglob("*.png"))
    mtime = png.stat().st_mtime_ns
    make_demo_data(config_a, progress=False)  # complete: nothing rewritten
    assert png.stat().st_mtime_ns == mtime
