"""Class consistency: the share of images the domain classifier puts in their conditioning
class, computed through the real torch-fidelity extractor path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from enat.evaluation.config import FeatureTrainConfig
from enat.evaluation.evaluate import class_targets, sample_targets
from enat.evaluation.features import class_consistency, stratified_split, train_domain_extractor
from enat.evaluation.image_sets import ImageSet, ImageTensors, read_all
from enat.evaluation.metrics import extract_features, load_extractor
from enat.evaluation.sampling import Conditions, read_captions
from enat.pipelines.config import DemoDataConfig
from enat.pipelines.demo_data import make_demo_data

pytestmark = pytest.mark.slow


CLASSES = ("animals_nature", "flags", "food_drink", "smileys_emotion", "travel_places")
PER_CLASS = 60
HOLDOUT = 0.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A classifier trained briefly on 60 demo emoji of each of 5 classes (a sub-tree, so
    training takes seconds, not minutes), and its logits on the held-out images."""
    root = tmp_path_factory.mktemp("consistency")
    make_demo_data(DemoDataConfig(out=str(root / "data")))
    tree = root / "tree"
    for name in CLASSES:
        (tree / "train" / name).mkdir(parents=True)
        for source in sorted((root / "data" / "imagenet" / "train" / name).iterdir())[:PER_CLASS]:
            shutil.copy(source, tree / "train" / name / source.name)
    config = FeatureTrainConfig(data=str(tree), out=str(root / "extractor"), width=8, epochs=4, batch_size=32,
                                holdout=HOLDOUT)
    meta = train_domain_extractor(config, progress=False)
    images, labels = read_all(ImageSet(f"imagenet:{tree}", 32))
    _, held = stratified_split(labels, config.holdout, config.seed)  # the images training held out
    extractor = load_extractor(config.out, device="cpu")
    logits = extract_features(extractor, ImageTensors(images[held]), 64)["logits"]
    return {"meta": meta, "extractor": extractor, "labels": labels[held], "logits": logits}


def test_real_held_out_images_with_true_labels_give_the_held_out_accuracy(trained):
    extractor, labels = trained["extractor"], trained["labels"]
    assert extractor.classes == trained["meta"]["classes"] and extractor.classes == list(CLASSES)
    assert extractor.real_accuracy == trained["meta"]["holdout_accuracy"]
    measured = class_consistency(trained["logits"], labels)
    assert measured == pytest.approx(trained["meta"]["holdout_accuracy"], abs=1e-9)
    assert measured > 0.35  # well above chance (0.2): the classifier learned something


def test_shuffled_labels_fall_to_chance(trained):
    labels, logits = trained["labels"], trained["logits"]
    true = class_consistency(logits, labels)
    rng = np.random.default_rng(0)
    shuffled = np.mean([class_consistency(logits, rng.permutation(labels)) for _ in range(200)])
    # Every class holds out the same number of images, so a shuffle is right 1/C of the time
    # in expectation whatever the classifier predicts; 200 shuffles land within ~0.005 of it.
    assert np.bincount(labels).tolist() == [round(HOLDOUT * PER_CLASS)] * len(CLASSES)
    assert abs(shuffled - 1 / len(CLASSES)) < 0.03
    assert shuffled < 0.6 * true


def test_targets_map_by_class_name_and_skip_unknown_classes():
    classes = ["animals", "food", "flags"]
    targets = class_targets(["flags", "animals", None, "unknown"], classes)
    assert targets.tolist() == [2, 0, -1, -1]
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert class_consistency(logits, targets) == 0.5  # row 0 right, row 1 wrong, rows 2-3 left out
    assert class_consistency(logits, np.array([-1, -1, -1, -1])) is None
    assert class_targets(None, classes) is None and class_targets(["food"], None) is None


def test_model_class_ids_reach_the_classifier_through_names():
    model_classes = ["animals", "food", "flags"]  # the training manifest's order
    classifier = ["flags", "animals", "food"]  # the same classes, trained in another order
    labels = Conditions(labels=np.array([0, 1, 2, 2]))
    assert sample_targets(labels, model_classes, 3, classifier).tolist() == [1, 2, 0, 0]
    # Logits that favour the right class under the classifier's order: all consistent.
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 0]), 3).float()
    assert class_consistency(logits, sample_targets(labels, model_classes, 3, classifier)) == 1.0
    # No names for the model's ids: identity when the counts agree, else no metric.
    assert sample_targets(labels, None, 3, classifier).tolist() == [0, 1, 2, 2]
    assert sample_targets(labels, None, 4, classifier) is None
    assert sample_targets(labels, model_classes, 3, None) is None
    captions = Conditions(captions=["a", "b"], caption_classes=["food", None])
    assert sample_targets(captions, None, 10, classifier).tolist() == [2, -1]


def test_captions_may_name_their_class(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("grinning face\tsmileys_emotion\n\nred apple\n  flag: France\tflags \n")
    assert read_captions(str(path)) == [("grinning face", "smileys_emotion"), ("red apple", None),
                                        ("flag: France", "flags")]
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n a dog \n")
    assert read_captions(str(plain)) == [("a cat", None), ("a dog", None)]
