"""Image decoding and preprocessing as the papers do it, with a reason for every rejection.

`decode_image` turns raw bytes into an RGB image or raises `RejectedInput` with a short
reason (empty, not an image, truncated, absurd dimensions, too small). Unusual but valid
modes (CMYK, 16-bit, palette, alpha) are converted, and the conversion is reported, so
nothing is silent; an EXIF orientation tag is applied. `center_crop` is the ADM/U-ViT
recipe: resize the shorter side to the resolution (box-halving first for large images),
then crop the center.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from enat.pipelines.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE


class RejectedInput(ValueError):
    """An input that cannot become a training image; str() is the reason."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB plus a note when the source mode needed more than a trivial conversion."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image), f"{mode} with alpha composited on white"
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PIL opens 16-bit PNGs as "I;16" or "I"): scale by the bit depth, so
        # a dark image stays dark (PIL's own conversion clips; scaling by the maximum would
        # stretch it to full range).
        array = np.asarray(image, dtype=np.float64).clip(0, 65535)
        grey = Image.fromarray((array / 65535 * 255).round().astype(np.uint8))
        return grey.convert("RGB"), f"{mode} (16-bit) scaled to 8-bit"
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        note = None if mode == "L" else f"{mode} converted to RGB"
        return image.convert("RGB"), note
    raise RejectedInput(f"unsupported image mode {mode}")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE) -> tuple[Image.Image, str | None]:
    """(RGB image, conversion note or None), or RejectedInput with the reason."""
    if not data:
        raise RejectedInput("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RejectedInput(f"absurd dimensions {width}x{height} "
                                    f"(over {max_pixels:,} pixels: decompression-bomb guard)")
            if min(width, height) < min_side:
                raise RejectedInput(f"too small: {width}x{height} (min side {min_side})")
            image.load()  # decode now, so truncation shows up here
            # Phone photos store pixels unrotated plus an EXIF orientation tag: apply it, as
            # PIL viewers and torchvision's decoders do.
            image = ImageOps.exif_transpose(image)
    except RejectedInput:
        raise
    except UnidentifiedImageError:
        raise RejectedInput("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RejectedInput("absurd dimensions (decompression-bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RejectedInput(f"truncated or corrupt image ({str(err).splitlines()[0][:120]})") from None
    return _to_rgb(image)


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` and crop the center square (ADM/U-ViT)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_array(image: Image.Image) -> np.ndarray:
    """uint8 [3, H, W]; divide by 255 for the tokenizer's [0, 1] input."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
