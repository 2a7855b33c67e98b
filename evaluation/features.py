"""The domain feature extractor: a small CNN classifier (models/classifier.py) trained on
the data set itself.

Inception-v3 features mean little for 32x32 emoji and cost ~0.7 s per image on a CPU, so
the demo measures FID/KID/IS with a classifier trained on its own data (`enat eval
train-features`). It is saved by pipelines.model_io.save_classifier under a URL, with the id
`domain-<first 12 hex digits of the weights' sha256>`, and is a torch-fidelity
feature extractor (registered as `enat-domain`; its weights location is torch-fidelity's
`feature_extractor_weights_path`). It provides:
- '128': the globally pooled last conv features (FID, KID),
- 'logits_unbiased' and 'logits': class logits without/with the bias (IS uses the first,
  as torch-fidelity's Inception does).
Any input size is resized to the training resolution first.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm import tqdm

from enat.evaluation.config import FeatureTrainConfig
from enat.evaluation.image_sets import ImageSet, ImageSetError, read_all
from enat.models.classifier import FEATURE_DIM, DomainNet, normalise_pixels
from enat.models.device import pick_device
from enat.pipelines import model_io
from enat.pipelines.sources import SOURCE_KINDS

EXTRACTOR_NAME = "enat-domain"  # torch-fidelity registry name
FEATURE_LAYER = str(FEATURE_DIM)


def normalise(images: Tensor, resolution: int) -> Tensor:
    """uint8 [B, 3, H, W] -> the classifier's float input at `resolution`."""
    x = images.float() / 255.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return normalise_pixels(x)


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's interface around a saved DomainNet (weights URL = the folder)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError(f"the {EXTRACTOR_NAME} extractor needs feature_extractor_weights_path "
                             f"(the folder `enat eval train-features` wrote)")
        self.net, self.meta = model_io.load_classifier(feature_extractor_weights_path)
        self.extractor_id = self.meta["id"]
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURE_LAYER, "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": FEATURE_LAYER, "kid": FEATURE_LAYER,
                "prc": FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        features, logits = self.net(normalise(images, self.meta["resolution"]))
        unbiased = logits - self.net.head.bias
        provided = {FEATURE_LAYER: features, "logits_unbiased": unbiased, "logits": logits}
        return tuple(provided[name].float() for name in self.features_list)


def register() -> None:
    """Make `enat-domain` known to torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DomainFeatureExtractor)


def stratified_split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `holdout` of every class (at least one image of
    a class with two or more), chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(holdout * len(members)))
        count = max(count, 1) if holdout > 0 and len(members) >= 2 else count
        held.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _augment(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (reflect padding)."""
    flip = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    padded = F.pad(batch, (2, 2, 2, 2), mode="reflect")
    size = batch.shape[-1]
    offsets = torch.randint(0, 5, (len(batch), 2), generator=generator)
    crops = [padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())]
    return torch.stack(crops)


@torch.no_grad()
def accuracy(net: DomainNet, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    net.eval()
    correct = sum(int((net(images[i : i + batch_size])[1].argmax(-1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)


def class_consistency(logits: Tensor, targets: np.ndarray) -> float | None:
    """Share of images the classifier puts in their target class (the class a sample was
    conditioned on). Targets < 0 (a class the classifier does not know) are left out;
    None when no target is known."""
    known = torch.from_numpy(np.asarray(targets) >= 0)
    if not bool(known.any()):
        return None
    predicted = logits.argmax(dim=-1)[known]
    return float((predicted == torch.as_tensor(np.asarray(targets))[known]).double().mean())


def train_domain_extractor(config: FeatureTrainConfig, progress: bool = True) -> dict:
    """Train, measure held-out accuracy, publish; returns the saved metadata."""
    device = pick_device(config.device)
    spec = config.data if config.data.partition(":")[0] in SOURCE_KINDS else f"imagenet:{config.data}"
    images_set = ImageSet(spec, config.resolution, limit=config.limit)
    started = time.monotonic()
    images, labels = read_all(images_set)
    classes = images_set.classes or []
    found = 0 if labels is None else len(np.unique(labels))
    if found < 2:
        raise ImageSetError(f"{config.data} needs images in two or more class folders to train a "
                            f"classifier (found {found})")
    read_seconds = time.monotonic() - started
    train_idx, held_idx = stratified_split(labels, config.holdout, config.seed)
    x = normalise(torch.from_numpy(images), config.resolution).to(device)
    y = torch.from_numpy(labels).to(device)

    torch.manual_seed(config.seed)
    net = DomainNet(len(classes), config.width).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(len(train_idx) // config.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr,
                                                   total_steps=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.monotonic()
    for _ in tqdm(range(config.epochs), desc="train-features", unit="epoch", disable=not progress):
        net.train()
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size].to(device)
            batch = _augment(x[index].cpu(), generator).to(device)
            loss = F.cross_entropy(net(batch)[1], y[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.monotonic() - started
    started = time.monotonic()
    held_accuracy = accuracy(net, x[held_idx], y[held_idx]) if len(held_idx) else float("nan")
    train_accuracy = accuracy(net, x[train_idx], y[train_idx])
    eval_seconds = time.monotonic() - started

    return model_io.save_classifier(config.out, net, {
        "kind": EXTRACTOR_NAME, "feature_dim": FEATURE_DIM, "width": config.width,
        "resolution": config.resolution, "classes": classes, "data": config.data, "images": len(labels),
        "skipped": images_set.skipped, "train_images": len(train_idx), "holdout_images": len(held_idx),
        "holdout_accuracy": held_accuracy, "train_accuracy": train_accuracy, "read_seconds": read_seconds,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "config": asdict(config)})
