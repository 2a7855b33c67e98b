"""Evaluate one checkpoint: sample with a strategy, measure FID/KID/IS against a reference,
count FLOPs per image, time the sampling. What `enat eval checkpoint` and the eval
dispatcher call. With a domain extractor (a classifier of the data set's classes) also
class consistency: the share of samples it assigns to their conditioning class, reported
beside its accuracy on real held-out images, the figure real data reaches.

Samples stream: each batch is generated, decoded and passed through the feature extractor,
and only the images of the grid are kept, so 50k samples need no more memory than one
batch. The reference is processed first, so a bad reference or an extractor mismatch fails
before any sampling.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from torch import Tensor, nn

from enat.evaluation.config import EvalConfig
from enat.evaluation.features import class_consistency
from enat.evaluation.metrics import (
    ReferenceStats,
    extract_features,
    load_extractor,
    metrics_from_features,
    reference_stats,
)
from enat.evaluation.sampling import (
    Conditions,
    GridCollector,
    iter_samples,
    load_sampler,
    make_conditions,
    png_bytes,
)
from enat.evaluation.strategy_io import describe_strategy, load_strategy, save_strategy
from enat.models.flops import generation_flops
from enat.models.strategy import Strategy
from enat.pipelines import storage
from enat.pipelines.model_io import CONFIG_NAME

# Meaningful per extractor only (class consistency: per classifier).
EXTRACTOR_METRICS = ("fid", "kid", "kid_std", "is", "is_std", "class_consistency", "classifier_real_accuracy")
PLAIN_METRICS = ("gflops_per_image", "gflops_per_image_with_decoder", "images_per_s")


def evaluation_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """A result's metrics for MLflow: extractor-dependent ones as `<metric>/<extractor id>`,
    so values from different extractors never share a chart."""
    extractor_id = result["extractor_id"]
    metrics = {f"{prefix}{key}/{extractor_id}": result[key] for key in EXTRACTOR_METRICS
               if result.get(key) is not None}
    metrics.update({f"{prefix}{key}": result[key] for key in PLAIN_METRICS if key in result})
    return metrics


def metrics_line(result: dict) -> str:
    """`fid 2.15  kid 0.01 ...` for a terminal."""
    return "  ".join(f"{key} {result[key]:.4g}" for key in EXTRACTOR_METRICS if result.get(key) is not None)


def _timed(batches: Iterator, grid: GridCollector, clock: dict) -> Iterator[Tensor]:
    """The batches' images, feeding the grid; clock["seconds"] sums the generation time only."""
    while True:
        began = time.perf_counter()
        batch = next(batches, None)
        clock["seconds"] += time.perf_counter() - began
        if batch is None:
            return
        grid.add(batch.images, batch.conditions.labels)
        yield batch.images


def class_targets(names: list[str | None] | None, classes: list[str] | None) -> np.ndarray | None:
    """Each sample's class as the classifier's index (-1: a class it does not know); None
    when either side has no class names. Matching goes by name, so the classifier's class
    order need not be the model's."""
    if names is None or classes is None:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(name, -1) if name is not None else -1 for name in names], dtype=np.int64)


def sample_targets(conditions: Conditions, model_classes: list[str] | None, num_classes: int,
                   classifier_classes: list[str] | None) -> np.ndarray | None:
    """The classifier's index of every sample's conditioning class (-1: unknown), or None
    when there is no sound mapping. Captions carry their class names; class ids are named
    through `model_classes` (the training manifest's). Without usable names, ids are taken
    as the classifier's own only when both have the same number of classes."""
    if classifier_classes is None:
        return None
    if conditions.labels is None:
        return class_targets(conditions.caption_classes, classifier_classes)
    if model_classes is None or len(model_classes) != num_classes:
        if num_classes != len(classifier_classes):
            return None
        model_classes = classifier_classes
    return class_targets([model_classes[label] for label in conditions.labels.tolist()], classifier_classes)


def flops_per_image(model: nn.Module, tokenizer: nn.Module, strategy: Strategy,
                    reuse: bool) -> tuple[int, int]:
    """(transformer FLOPs, FLOPs including the VQ decoder) of one image, counted on the CPU:
    models.flops builds its example condition there."""
    if next(model.parameters()).device.type != "cpu":
        model, tokenizer = copy.deepcopy(model).cpu(), copy.deepcopy(tokenizer).cpu()
    return (generation_flops(model, strategy, reuse=reuse),
            generation_flops(model, strategy, decoder=tokenizer, reuse=reuse))


class CheckpointEvaluator:
    """A checkpoint, its tokenizer, an extractor and the reference statistics, loaded once;
    call it with a strategy for metrics (a strategy search calls it many times)."""

    def __init__(self, checkpoint_url: str, tokenizer_url: str = "", reference: str | ReferenceStats = "",
                 extractor: str = "inception", *, batch_size: int = 50, captions: str = "",
                 device: str = "auto", precision: str = "auto", reuse: bool = True):
        self.sampler = load_sampler(checkpoint_url, tokenizer_url, device, precision, reuse)
        self.extractor = load_extractor(extractor, device)
        self.reference = reference if isinstance(reference, str) else f"{reference.num_images} images' stats"
        self.batch_size, self.captions = batch_size, captions
        self.stats = reference_stats(reference, self.extractor, self.sampler.resolution,
                                     batch_size=batch_size)
        meta = json.loads(storage.read_bytes(storage.join(self.sampler.checkpoint_url, CONFIG_NAME)))
        self.step = meta.get("step")

    def __call__(self, strategy: Strategy, num_samples: int, seed: int, *, label: str = "", out: str = "",
                 kid: bool = True, isc: bool = True, flops: bool = True, progress: bool = True) -> dict:
        sampler = self.sampler
        conditions = make_conditions(sampler, num_samples, self.captions)
        grid, clock = GridCollector(), {"seconds": 0.0}
        batches = iter_samples(sampler, strategy, conditions, self.batch_size, seed, progress)
        generated = extract_features(self.extractor, _timed(batches, grid, clock), self.batch_size)
        result = metrics_from_features(generated, self.stats, self.extractor, kid, isc, seed)
        targets = sample_targets(conditions, sampler.class_names, sampler.config.num_classes,
                                 self.extractor.classes)
        consistency = None if targets is None else class_consistency(generated["logits"], targets)
        if consistency is not None:
            # Read beside the classifier's accuracy on real held-out images: what real data reaches.
            result["class_consistency"] = consistency
            result["classifier_real_accuracy"] = self.extractor.real_accuracy
        if flops:
            transformer, decoded = flops_per_image(sampler.model, sampler.tokenizer, strategy, sampler.reuse)
            result.update(gflops_per_image=transformer / 1e9, gflops_per_image_with_decoder=decoded / 1e9)
        out = out or tempfile.mkdtemp(prefix="enat-eval-")
        result.update({
            "seed": seed, "steps": strategy.steps, "strategy": label or f"custom-{strategy.steps}",
            "strategy_yaml": strategy.to_yaml(), "images_per_s": num_samples / clock["seconds"],
            "step": self.step, "model_id": sampler.model_id, "tokenizer_id": sampler.tokenizer_id,
            "checkpoint": sampler.checkpoint_url, "reference": self.reference,
            "grid": storage.join(out, "grid.png"), "out": out,
        })
        storage.write_bytes(result["grid"], png_bytes(grid.image()))
        save_strategy(storage.join(out, "strategy.yaml"), strategy)
        storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(result, indent=1).encode())
        return result


def evaluate_checkpoint(checkpoint_url: str, tokenizer_url: str = "", strategy: Strategy | str = "default",
                        num_samples: int = 1000, seed: int = 0, reference: str | ReferenceStats = "",
                        extractor: str = "inception", *, steps: int | None = None, batch_size: int = 50,
                        out: str = "", captions: str = "", device: str = "auto", precision: str = "auto",
                        reuse: bool = True, kid: bool = True, isc: bool = True,
                        progress: bool = True) -> dict:
    """Metrics of `num_samples` images from the checkpoint's EMA weights.

    `strategy` is a Strategy, "default" (with `steps`) or a YAML path/URL. Returns fid,
    kid/kid_std (when the reference has features), is/is_std (when the extractor has class
    logits), extractor_id, num_samples, reference_images, seed, steps, strategy (a label),
    strategy_yaml, gflops_per_image (transformer only), gflops_per_image_with_decoder,
    images_per_s (generation + decoding), step (the checkpoint's, when recorded),
    model_id, tokenizer_id, checkpoint, reference, grid (URL of the PNG) and out; with a
    domain extractor and known sample classes also class_consistency and
    classifier_real_accuracy (see sample_targets).
    """
    label = ""
    if isinstance(strategy, str):
        spec, strategy = strategy, load_strategy(strategy, steps)
        label = describe_strategy(spec, strategy)
    evaluator = CheckpointEvaluator(checkpoint_url, tokenizer_url, reference, extractor,
                                    batch_size=batch_size, captions=captions, device=device,
                                    precision=precision, reuse=reuse)
    return evaluator(strategy, num_samples, seed, label=label, out=out, kid=kid, isc=isc, progress=progress)


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    return evaluate_checkpoint(config.checkpoint, config.tokenizer, config.strategy, config.num_samples,
                               config.seed, config.reference, config.extractor, steps=config.steps or None,
                               batch_size=config.batch_size, out=config.out, captions=config.captions,
                               device=config.device, precision=config.precision, reuse=config.reuse,
                               kid=config.kid, isc=config.isc, progress=progress)
