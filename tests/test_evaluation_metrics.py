"""Metrics through the real torch-fidelity with a real (tiny) domain extractor trained on
demo emoji: FID of a set against itself, against noised copies, against stored statistics,
the extractor registry and ids, and the Inception weight handling."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from enat.evaluation.config import FeatureTrainConfig, FidStatsConfig
from enat.evaluation.features import EXTRACTOR_NAME, train_domain_extractor
from enat.evaluation.image_sets import ImageSet, ImageTensors, read_all
from enat.evaluation.metrics import (
    ExtractorMismatch,
    MissingWeights,
    ReferenceStats,
    check_same_extractor,
    compute_fid_stats,
    extract_features,
    load_extractor,
    metrics_from_features,
    real_floor,
    reference_stats,
)
from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import make_demo_data
from enat.pipelines.model_io import CLASSIFIER_WEIGHTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """200 demo emoji (2 classes) as a class tree, a tiny trained extractor, the images."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(DemoDataConfig(out=str(root / "data"), limit=200))
    tree = str(root / "data" / "imagenet")
    config = FeatureTrainConfig(data=tree, out=str(root / "extractor"), width=8, epochs=2, batch_size=32)
    meta = train_domain_extractor(config, progress=False)
    images, _ = read_all(ImageSet(f"imagenet:{tree}", 32))
    return {"tree": tree, "extractor_url": str(root / "extractor"), "meta": meta, "images": images,
            "root": root}


@pytest.fixture(scope="module")
def extractor(demo):
    return load_extractor(demo["extractor_url"], device="cpu")


def noised(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def metrics_of(images: np.ndarray, reference: str | ReferenceStats, extractor) -> dict:
    """What evaluation does (evaluation/evaluate.py): the reference's statistics at 32 px,
    then the images' features against them."""
    stats = reference_stats(reference, extractor, 32)
    return metrics_from_features(extract_features(extractor, ImageTensors(images)), stats, extractor)


def test_fid_of_a_set_against_itself_is_zero(demo, extractor):
    images = demo["images"]
    result = metrics_of(images, f"imagenet:{demo['tree']}", extractor)
    assert abs(result["fid"]) < 1e-3
    assert result["extractor_id"] == demo["meta"]["id"]
    assert result["num_samples"] == result["reference_images"] == len(images) == 200
    assert {"kid", "kid_std", "is", "is_std"} <= set(result)


def test_fid_grows_with_noise(demo, extractor):
    images = demo["images"]
    stats = reference_stats(f"imagenet:{demo['tree']}", extractor, 32)
    fids = [metrics_of(noised(images, sigma), stats, extractor)["fid"]
            for sigma in (0.0, 8.0, 24.0, 64.0)]
    assert fids[0] < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


def test_fid_against_stats_equals_fid_against_files(demo, extractor, tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for i, image in enumerate(demo["images"][:120]):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    generated = noised(demo["images"][80:], 16.0, seed=1)

    against_files = metrics_of(generated, str(folder), extractor)
    stats = compute_fid_stats(FidStatsConfig(images=str(folder), out=str(tmp_path / "stats.npz"),
                                             extractor=demo["extractor_url"], resolution=32, device="cpu"))
    against_stats = metrics_of(generated, str(tmp_path / "stats.npz"), extractor)
    assert stats.num_images == 120 and stats.extractor_id == extractor.extractor_id
    assert against_stats["fid"] == pytest.approx(against_files["fid"], rel=1e-9, abs=1e-9)
    assert against_stats["kid"] == pytest.approx(against_files["kid"], rel=1e-9, abs=1e-12)

    # torch-fidelity's own top-level API, reading the folder itself, agrees.
    theirs = torch_fidelity.calculate_metrics(
        input1=ImageTensors(generated), input2=str(folder), fid=True, feature_extractor=EXTRACTOR_NAME,
        feature_extractor_weights_path=demo["extractor_url"], cuda=False, cache=False, save_cpu_ram=True,
        verbose=False)
    assert theirs[torch_fidelity.KEY_METRIC_FID] == pytest.approx(against_files["fid"], rel=1e-5)

    # ADM/U-ViT files hold only mu and sigma: FID works, KID is left out.
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(ExtractorMismatch, match="inception-v3-compat"):
        metrics_of(generated, str(adm), extractor)


def test_extractor_registered_and_its_id_stored(demo, extractor, tmp_path):
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME].__name__ == "DomainFeatureExtractor"
    weights = (Path(demo["extractor_url"]) / CLASSIFIER_WEIGHTS).read_bytes()
    assert extractor.extractor_id == f"domain-{hashlib.sha256(weights).hexdigest()[:12]}"
    stats = compute_fid_stats(FidStatsConfig(images=f"imagenet:{demo['tree']}", out=str(tmp_path / "s.npz"),
                                             extractor=demo["extractor_url"], resolution=32, limit=50,
                                             keep_features=False, device="cpu"))
    loaded = ReferenceStats.load(str(tmp_path / "s.npz"))
    assert loaded.extractor_id == extractor.extractor_id and loaded.num_images == 50
    assert loaded.features is None and stats.features is None

    # Stats from another extractor are refused, and so is comparing mixed results.
    other = ReferenceStats(loaded.mu, loaded.sigma, "domain-000000000000", 50)
    with pytest.raises(ExtractorMismatch, match="cannot be compared"):
        metrics_of(demo["images"][:20], other, extractor)
    with pytest.raises(ExtractorMismatch):
        check_same_extractor({"extractor_id": "inception-v3-compat"}, {"extractor_id": "domain-1"})
    assert check_same_extractor({"extractor_id": extractor.extractor_id}, loaded) == extractor.extractor_id


def test_real_floor_is_small_but_positive(demo, extractor):
    floor = real_floor(demo["images"], extractor, seed=0)
    assert floor["num_samples"] == floor["reference_images"] == 100
    assert 0 < floor["fid"] < metrics_of(noised(demo["images"], 64.0), f"imagenet:{demo['tree']}",
                                         extractor)["fid"]


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(MissingWeights, match=r"weights-inception-2015-12-05-6726825d\.pth") as error:
        load_extractor("inception", device="cpu", download=False)
    assert str(tmp_path / "torch-home") in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(MissingWeights, match="not found at /nowhere/inception.pth"):
        load_extractor("inception:/nowhere/inception.pth", device="cpu")


def test_inception_from_an_explicit_weights_file(tmp_path, monkeypatch):
    """The inception-v3-compat path end to end, with random weights in torch-fidelity's format."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    random_model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    path = tmp_path / "inception.pth"
    torch.save(random_model.state_dict(), path)

    extractor = load_extractor(f"inception:{path}", device="cpu")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.extractor_id == f"inception-v3-compat-{sha[:12]}"
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    features = extract_features(extractor, ImageTensors(images))
    assert features["2048"].shape == (6, 2048) and features["logits_unbiased"].shape[0] == 6
    result = metrics_of(images, ReferenceStats.from_features(
        features["2048"], extractor.extractor_id), extractor)
    assert abs(result["fid"]) < 1e-2 and result["is"] > 0
