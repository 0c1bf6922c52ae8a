"""Image decoding and resizing shared by every command (import, resize, mine, detect).

One decoder and one resizer, so an image seen by `detect` is prepared exactly as the training
data was. Pillow and numpy only: this module must stay importable without torch.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError

# Decompression-bomb guard: a 32x32 tool has no business decoding a 10k x 10k image.
# Checked on the header, before any pixel is decoded. This is the one pixel limit: Pillow's
# own (MAX_IMAGE_PIXELS, higher) is reported in these words too (`too_many_pixels`).
MAX_PIXELS = 24_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 RGB array: EXIF rotation applied, alpha composited on white,
    16-bit and float images scaled to 8 bits (Pillow's convert('RGB') would clip them)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():  # a float TIFF holding NaN or infinity has no 8-bit picture
            raise ValueError("pixel values are NaN or infinite")
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 [H, W, 3]. Animated images give their first frame.

    Raises BadImageError naming `name` for anything undecodable, truncated or too large.
    """
    if not data:
        raise BadImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own (higher) limit; ours, just below, is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise too_many_pixels(name, f"{height}x{width} = {width * height:,} pixels", max_pixels)
            img.seek(0)
            img.load()
            return to_rgb(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses twice its own limit inside Image.open, before the size is ours to read.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found and int(found.group(1)) > max_pixels:
            raise too_many_pixels(name, f"{int(found.group(1)):,} pixels", max_pixels) from exc
        raise BadImageError(f"{name}: cannot decode ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else f"cannot decode ({exc})"
        raise BadImageError(f"{name}: {reason}") from exc


def too_many_pixels(name: str, what: str, max_pixels: int = MAX_PIXELS) -> BadImageError:
    """The refusal of an image over the pixel limit, in the same words wherever it is met."""
    return BadImageError(
        f"{name}: {what}, over the {max_pixels:,}-pixel limit", "refusing a possible decompression bomb"
    )


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, str(path), max_pixels)


def parse_size(text: str | int) -> tuple[int, int]:
    """'32' -> (32, 32); '24x32' -> (24, 32) as height x width."""
    from .errors import UsageError

    try:
        if isinstance(text, int):
            h = w = text
        else:
            parts = str(text).lower().replace("×", "x").split("x")
            h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
            if len(parts) > 2:
                raise ValueError
    except ValueError:
        raise UsageError(f"bad size {text!r}", "use N or HxW, e.g. 32 or 32x32") from None
    if not (1 <= h <= 8192 and 1 <= w <= 8192):
        raise UsageError(f"bad size {text!r}", "height and width must be 1..8192")
    return h, w


# Lanczos with a reducing gap: Pillow first box-reduces by an integer factor to within 2x of
# the target, then applies Lanczos. For 256 -> 32 this is ~4x faster than a full Lanczos and
# within 0.6 gray levels of it (bench/bench_resize.py measures both on every run).
REDUCING_GAP = 2.0


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased resize of one uint8 [H, W, 3] image to (height, width)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    image = np.ascontiguousarray(image, dtype=np.uint8)
    # frombuffer wraps the array without the copy fromarray makes.
    src = Image.frombuffer("RGB", (image.shape[1], image.shape[0]), image, "raw", "RGB", 0, 1)
    out = src.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return np.asarray(out, dtype=np.uint8)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a batch uint8 [N, H, W, 3] -> [N, h, w, 3]. (Threads were measured and gave
    nothing on 2 cores: the per-image work is too small to amortise the handoff.)"""
    h, w = size
    if images.shape[1:3] == (h, w):
        return images
    out = np.empty((len(images), h, w, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_image(img, size)
    return out
