"""FID, KID and IS through torch-fidelity, always labelled with the feature extractor's id.

Extractors (`load_extractor(spec)`):
- `inception` (torch-fidelity's inception-v3-compat, the papers' FID): weights from
  torch-fidelity's cache ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth),
  downloaded there if the machine can, or from an explicit file with `inception:<path>`
  (offline clusters). Id `inception-v3-compat` (plus the weights' sha256 prefix when the
  file is not the standard one).
- a domain extractor folder (`domain:<url>` or the URL itself), see evaluation/features.py.
  Id `domain-<sha12>`.

The extractor module, the feature extraction loop over a Dataset and the metric formulas
are torch-fidelity's own; features are computed once per input and every metric is
derived from them, so a reference can equally be a set of images or stored statistics
(ADM/U-ViT npz: `mu`, `sigma`; ours add `extractor_id`, `num_images`, `resolution` and
optionally `features` for KID). torch-fidelity's on-disk cache is never used: inputs here
change from call to call under the same names. FIDs of different extractors mean different
things: anything that compares two results (or a result with stored statistics) refuses
a mismatch.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from enat.evaluation import features as domain
from enat.evaluation.config import FidStatsConfig
from enat.evaluation.image_sets import ImageSet
from enat.models.device import pick_device
from enat.models.errors import MissingInput, UserError
from enat.pipelines import storage

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA_PREFIX = "6726825d"
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


class ExtractorMismatch(UserError, ValueError):
    """Two results (or a result and stored statistics) from different feature extractors."""


class MissingWeights(MissingInput):
    """The Inception weights are neither at the given path nor in torch-fidelity's cache."""


@dataclass
class Extractor:
    """A torch-fidelity feature extractor and the id that labels its metrics."""

    extractor_id: str
    module: FeatureExtractorBase
    fid_layer: str
    isc_layer: str | None  # None: no class logits, so no Inception Score
    device: torch.device
    # A domain extractor is a classifier of the data set's classes: their names (index
    # order) and its held-out accuracy on real images, for class consistency.
    classes: list[str] | None = None
    real_accuracy: float | None = None


def inception_weights(path: str = "", download: bool = True) -> str:
    """A local Inception weights file: `path`, else torch-fidelity's cache (downloading it
    there when `download` and the network allow)."""
    if path:
        if not Path(path).is_file():
            raise MissingWeights(f"inception weights not found at {path}: copy {INCEPTION_FILE} there")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    hint = (f"inception-v3-compat weights missing: put {INCEPTION_FILE} in {cached.parent} or use "
            f"extractor=inception:<path to it>")
    if not download:
        raise MissingWeights(hint)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except OSError as err:  # URLError is an OSError: offline, or no route
        raise MissingWeights(f"{hint} (download failed: {str(err).splitlines()[0][:80]})") from None
    return str(cached)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_extractor(spec: str = "inception", device: str | torch.device = "auto",
                   download: bool = True) -> Extractor:
    """`inception`, `inception:<weights file>`, `domain:<url>` or a domain extractor URL."""
    device = pick_device(device) if isinstance(device, str) else device
    kind, _, rest = spec.partition(":")
    if kind in ("inception", INCEPTION):
        weights = inception_weights(rest, download)
        sha = _sha256(weights)
        extractor_id = INCEPTION if sha.startswith(INCEPTION_SHA_PREFIX) else f"{INCEPTION}-{sha[:12]}"
        name, layers = INCEPTION, ["2048", "logits_unbiased"]
    else:
        weights = rest if kind == "domain" else spec
        domain.register()
        # "logits" (with the bias) decide the predicted class; IS uses the unbiased ones.
        name, extractor_id = domain.EXTRACTOR_NAME, None
        layers = [domain.FEATURE_LAYER, "logits_unbiased", "logits"]
    module = create_feature_extractor(name, layers, cuda=device.type == "cuda",
                                      feature_extractor_weights_path=weights, verbose=False)
    if extractor_id:
        return Extractor(extractor_id, module, layers[0], layers[1], device)
    accuracy = module.meta.get("holdout_accuracy")  # NaN when trained with holdout=0: unknown
    accuracy = None if accuracy is None or np.isnan(accuracy) else float(accuracy)
    return Extractor(module.extractor_id, module, layers[0], layers[1], device, list(module.meta["classes"]),
                     accuracy)


def extract_features(extractor: Extractor, images: Dataset | Iterable[Tensor], batch_size: int = 64) -> dict:
    """Feature name -> float tensor [N, D] for uint8 [*, 3, H, W] images: a Dataset (through
    torch-fidelity's own loop) or an iterable of batches (e.g. generated on the fly)."""
    cuda = extractor.device.type == "cuda"
    if isinstance(images, Dataset):
        return get_featuresdict_from_dataset(images, extractor.module, batch_size, cuda, True, False)
    parts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for batch in images:
            output = extractor.module(batch.to(extractor.device))
            for key, value in extractor.module.convert_features_tuple_to_dict(output).items():
                parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise ValueError("no images to extract features from")
    return {key: torch.cat(values) for key, values in parts.items()}


@dataclass
class ReferenceStats:
    """FID statistics of a reference set (and its features, for KID, when kept)."""

    mu: np.ndarray
    sigma: np.ndarray
    extractor_id: str
    num_images: int
    resolution: int = 0  # 0: unknown (e.g. an ADM file)
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: Tensor, extractor_id: str, resolution: int = 0,
                      keep_features: bool = True) -> ReferenceStats:
        stats = fid_features_to_statistics(features.double())
        return cls(stats["mu"], stats["sigma"], extractor_id, len(features), resolution,
                   features.numpy().astype(np.float32) if keep_features else None)

    def save(self, url: str) -> None:
        buffer = io.BytesIO()
        extra = {} if self.features is None else {"features": self.features}
        np.savez(buffer, mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64),
                 extractor_id=np.array(self.extractor_id), num_images=np.array(self.num_images),
                 resolution=np.array(self.resolution), **extra)
        storage.write_bytes(url, buffer.getvalue())

    @classmethod
    def load(cls, url: str) -> ReferenceStats:
        """Ours or an ADM/U-ViT file (mu, sigma only: those are Inception pool3 statistics)."""
        if not storage.exists(url):
            raise MissingInput(f"no reference statistics at {url}: compute them with `enat fid-stats`")
        # np.load on the opened file reads only the arrays asked for, not e.g. 50k images.
        with storage.open_file(url) as handle, np.load(handle, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{url} has no mu/sigma: not a statistics file")
            get = lambda key, default: data[key] if key in data else default
            return cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64),
                       str(get("extractor_id", INCEPTION)), int(get("num_images", 0)),
                       int(get("resolution", 0)), get("features", None))


def is_stats_file(url: str) -> bool:
    if not url.endswith(".npz"):
        return False
    if not storage.exists(url):
        raise MissingInput(f"reference not found: {url}")
    with storage.open_file(url) as handle, np.load(handle, allow_pickle=False) as data:
        return "mu" in data.files


def check_same_extractor(*items: dict | ReferenceStats) -> str:
    """The common extractor id of metric dicts / statistics; ExtractorMismatch otherwise."""
    ids = {item.extractor_id if isinstance(item, ReferenceStats) else item["extractor_id"] for item in items}
    if len(ids) != 1:
        raise ExtractorMismatch(f"metrics from different feature extractors ({', '.join(sorted(ids))}) "
                                f"cannot be compared: recompute them with one extractor")
    return ids.pop()


def metrics_from_features(generated: dict, reference: ReferenceStats, extractor: Extractor,
                          kid: bool = True, isc: bool = True, seed: int = 2020) -> dict:
    """fid, kid/kid_std (when the reference kept features), is/is_std (when the extractor
    has class logits), extractor_id, num_samples, reference_images."""
    check_same_extractor({"extractor_id": extractor.extractor_id}, reference)
    features = generated[extractor.fid_layer]
    own = fid_features_to_statistics(features.double())
    fid = fid_statistics_to_metric({"mu": own["mu"], "sigma": own["sigma"]},
                                   {"mu": reference.mu, "sigma": reference.sigma}, False)
    result = {"fid": float(next(iter(fid.values()))), "extractor_id": extractor.extractor_id,
              "num_samples": len(features), "reference_images": reference.num_images}
    if kid and reference.features is not None:
        size = min(KID_SUBSET_SIZE, len(features), len(reference.features))
        out = kid_features_to_metric(features, torch.from_numpy(reference.features), kid_subsets=KID_SUBSETS,
                                     kid_subset_size=size, rng_seed=seed, verbose=False)
        result["kid"], result["kid_std"] = (float(v) for v in out.values())
    if isc and extractor.isc_layer is not None:
        out = isc_features_to_metric(generated[extractor.isc_layer], splits=min(IS_SPLITS, len(features)),
                                     shuffle=True, rng_seed=seed)
        result["is"], result["is_std"] = (float(v) for v in out.values())
    return result


def reference_stats(reference: str | ReferenceStats, extractor: Extractor, resolution: int,
                    tokenizer_url: str = "", batch_size: int = 64, limit: int = 0,
                    keep_features: bool = True) -> ReferenceStats:
    """Statistics of a reference: stored (npz with mu/sigma) or computed from an image set."""
    if isinstance(reference, ReferenceStats):
        return reference
    if is_stats_file(reference):
        stats = ReferenceStats.load(reference)
        check_same_extractor({"extractor_id": extractor.extractor_id}, stats)
        return stats
    images = ImageSet(reference, resolution, batch_size, limit, tokenizer_url, extractor.device)
    features = extract_features(extractor, (batch.images for batch in images), batch_size)
    return ReferenceStats.from_features(features[extractor.fid_layer], extractor.extractor_id, resolution,
                                        keep_features)


def real_floor(images: np.ndarray, extractor: Extractor, seed: int = 0, batch_size: int = 64) -> dict:
    """Metrics between two disjoint random halves of a real set: the best FID a generator
    can hope for at this sample count (FID is biased upwards at small N)."""
    from enat.evaluation.image_sets import ImageTensors

    order = np.random.default_rng(seed).permutation(len(images))
    features = extract_features(extractor, ImageTensors(images[order]), batch_size)
    half = len(images) // 2
    first = {key: value[:half] for key, value in features.items()}
    second = ReferenceStats.from_features(features[extractor.fid_layer][half : 2 * half],
                                          extractor.extractor_id)
    return metrics_from_features(first, second, extractor, seed=seed)


def compute_fid_stats(config: FidStatsConfig) -> ReferenceStats:
    """`enat fid-stats`: statistics of an image set, saved as an npz with the extractor id."""
    extractor = load_extractor(config.extractor, config.device)
    stats = reference_stats(config.images, extractor, config.resolution, config.tokenizer, config.batch_size,
                            config.limit, config.keep_features)
    stats.save(config.out)
    return stats
