"""Class consistency: the share of images the domain classifier puts in their conditioning
class, computed through the real torch-fidelity extractor path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.evaluate import class_targets
from evaluation.features import (
    FeatureTrainConfig,
    class_consistency,
    stratified_split,
    train_domain_extractor,
)
from evaluation.image_sets import ImageSet, ImageTensors, read_all
from evaluation.metrics import extract_features, load_extractor
from evaluation.sampling import read_captions
from pipelines.demo_data import DemoDataConfig, make_demo_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The whole demo set (10 classes) and a small classifier trained on it."""
    root = tmp_path_factory.mktemp("consistency")
    make_demo_data(DemoDataConfig(out=str(root / "data")))
    tree = str(root / "data" / "imagenet")
    config = FeatureTrainConfig(data=tree, out=str(root / "extractor"), width=8, epochs=3, holdout=0.2)
    meta = train_domain_extractor(config, progress=False)
    images, labels = read_all(ImageSet(f"imagenet:{tree}", 32))
    _, held = stratified_split(labels, config.holdout, config.seed)
    extractor = load_extractor(config.out, device="cpu")
    logits = extract_features(extractor, ImageTensors(images[held]), 64)["logits"]
    return {"meta": meta, "extractor": extractor, "labels": labels[held], "logits": logits}


def test_real_held_out_images_with_true_labels_give_the_held_out_accuracy(trained):
    extractor, labels = trained["extractor"], trained["labels"]
    assert extractor.classes == trained["meta"]["classes"] and len(extractor.classes) == 10
    assert extractor.real_accuracy == trained["meta"]["holdout_accuracy"]
    measured = class_consistency(trained["logits"], labels)
    assert measured == pytest.approx(trained["meta"]["holdout_accuracy"], abs=1e-9)
    assert measured > 0.3  # well above chance: the classifier learned something


def test_shuffled_labels_fall_to_chance(trained):
    labels, logits = trained["labels"], trained["logits"]
    true = class_consistency(logits, labels)
    permute = lambda seed: np.random.default_rng(seed).permutation(labels)  # noqa: E731
    shuffled = [class_consistency(logits, permute(seed)) for seed in range(5)]
    # Chance for these predictions = sum over classes of (share predicted) x (share labelled).
    predicted = logits.argmax(-1).numpy()
    chance = sum(np.mean(predicted == c) * np.mean(labels == c) for c in range(10))
    assert abs(np.mean(shuffled) - chance) < 0.05
    assert np.mean(shuffled) < 0.6 * true


def test_targets_map_by_class_name_and_skip_unknown_classes():
    classes = ["animals", "food", "flags"]
    targets = class_targets(["flags", "animals", None, "unknown"], classes)
    assert targets.tolist() == [2, 0, -1, -1]
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert class_consistency(logits, targets) == 0.5  # row 0 right, row 1 wrong, rows 2-3 left out
    assert class_consistency(logits, np.array([-1, -1, -1, -1])) is None
    assert class_targets(None, classes) is None and class_targets(["food"], None) is None


def test_captions_may_name_their_class(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("grinning face\tsmileys_emotion\n\nred apple\n  flag: France\tflags \n")
    assert read_captions(str(path)) == [("grinning face", "smileys_emotion"), ("red apple", None),
                                        ("flag: France", "flags")]
