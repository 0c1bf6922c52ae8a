"""Real or AI-generated? Scores images with a real/fake classifier.

The default model ships inside the package (`data/detector.onnx`) and runs on onnxruntime,
so this path never imports torch. Each image is decoded and resized by `fakecifar.images`,
the same code that prepared the training shards, so what the model sees at detection time is
what it saw in training.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadCheckpointError, BadImageError, FakecifarError, UsageError
from .images import decode_image, is_image_name, resize_images
from .manifest import MANIFEST
from .outputs import PARTIAL
from .samples import DATA
from .text import format_classes, format_size, paths_from_bytes

DEFAULT_MODEL = DATA / "detector.onnx"
# Beyond these the answer is less trustworthy: the model was trained on small square images.
MAX_ASPECT = 1.25
MAX_UPSCALE_FROM = 4  # inputs larger than 4x the model's side lose most detail when shrunk


@dataclass
class Verdict:
    path: str
    label: str
    p_fake: float


@dataclass
class Item:
    """One input image: its pixels, or the error that stopped us from getting them."""

    path: str
    image: np.ndarray | None = None
    error: FakecifarError | None = None


def fake_columns(classes: list[str]) -> np.ndarray:
    """Which output classes mean 'generated': 'fake' (2-class) or 'fake/<class>' (origin x class)."""
    mask = np.array([c.lower() == "fake" or c.lower().startswith("fake/") for c in classes])
    if not mask.any() or mask.all():
        raise BadCheckpointError(
            f"model classes {format_classes(classes)} have no real/fake split",
            "use a model trained with --target origin or origin+class",
        )
    return mask


class Detector:
    """A real/fake model (.onnx on onnxruntime; .pt/.th on torch) that scores uint8 images."""

    _predict: Callable[[np.ndarray], np.ndarray]  # uint8 images -> class probabilities

    def __init__(self, model: str | os.PathLike | None = None, arch: str | None = None, tta: bool = False):
        self.path = Path(model) if model else DEFAULT_MODEL
        self.tta = tta
        if not self.path.is_file():
            hint = "reinstall fakecifar" if model is None else "give an .onnx or .pt file"
            raise UsageError(f"{self.path}: no such model file", hint)
        if self.path.suffix.lower() == ".onnx":
            from .checkpoint import OnnxClassifier

            self._onnx = OnnxClassifier(self.path)
            self.classes, self.input_size = self._onnx.classes, self._onnx.input_size
            self._predict = self._onnx.predict_proba
        else:
            self._load_torch(arch)
        self.fake = fake_columns(self.classes)

    def _load_torch(self, arch: str | None) -> None:
        import torch

        from .checkpoint import load_checkpoint

        model, meta = load_checkpoint(self.path, arch=arch)
        mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.classes, self.input_size = list(meta["classes"]), tuple(meta["input_size"])

        def predict(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = (torch.from_numpy(images) - mean) / std
                return torch.softmax(model(x), dim=1).numpy()

        self._predict = predict

    def caution(self, image: np.ndarray) -> str | None:
        """Why an answer for this image is less trustworthy, if it is."""
        h, w = image.shape[:2]
        trained = format_size(self.input_size)
        if max(h, w) / min(h, w) > MAX_ASPECT:
            return f"{format_size((h, w))} (HxW) is not square; the model was trained on {trained} images"
        if min(h, w) > MAX_UPSCALE_FROM * max(self.input_size):
            return f"{format_size((h, w))} is much larger than the {trained} images the model was trained on"
        return None

    def p_fake(self, images: np.ndarray) -> np.ndarray:
        """P(generated) for uint8 images [N, H, W, 3] already at the model's input size; with
        `tta`, the mean over each image and its mirror (as `train --tta` validates)."""
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        probs = self._predict(x)
        if self.tta:
            probs = (probs + self._predict(np.ascontiguousarray(x[..., ::-1]))) / 2
        return probs[:, self.fake].sum(axis=1)


# --------------------------------------------------------------------------- inputs


def _sniff_image(data: bytes) -> bool:
    """Does this look like image bytes rather than a list of paths?"""
    signatures = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"P6")
    return data.startswith(signatures)


def check_stdin(data: bytes) -> None:
    """Refuse stdin bytes that are neither an image nor a list of paths (UsageError); the CLI
    calls it before the first answer, so an error never cuts the output short."""
    if not _sniff_image(data):
        paths_from_bytes(data, neither="an image")


def iter_items(
    inputs: Iterable[str], *, stdin: Callable[[], bytes] | None = None, on_skip: Callable[[str], None] | None = None
) -> Iterator[Item]:
    """Images from files, folders (recursively: image files and shards), shards (.h5) and
    '-' (image bytes on stdin, or one path a line; anything else there is a UsageError)."""
    for raw in inputs:
        if raw == "-":
            data = stdin() if stdin else sys.stdin.buffer.read()
            if _sniff_image(data):
                yield _decoded("-", data)
            else:
                yield from iter_items(paths_from_bytes(data, neither="an image"), on_skip=on_skip)
            continue
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = Path(root) / name
                    if is_image_name(name):
                        yield _read(full)
                    elif name.endswith(".h5"):
                        yield from _shard_items(full)
                    elif name == MANIFEST or name.startswith(".") or name.endswith(PARTIAL):
                        continue  # a dataset folder's bookkeeping (manifest, locks), hidden files
                    elif on_skip:
                        on_skip(f"{full}: skipped (not an image file name)")
        elif path.suffix == ".h5" and path.is_file():
            yield from _shard_items(path)
        else:
            yield _read(path)


def _decoded(name: str, data: bytes) -> Item:
    try:
        return Item(name, decode_image(data, name))
    except BadImageError as exc:
        return Item(name, error=exc)


def _read(path: Path) -> Item:
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read ({exc.strerror or exc})"
        return Item(str(path), error=BadImageError(f"{path}: {reason}"))
    return _decoded(str(path), data)


def _shard_items(path: Path) -> Iterator[Item]:
    from .shards import Shard

    try:
        shard = Shard(path)
    except FakecifarError as exc:
        yield Item(str(path), error=exc)
        return
    for start in range(0, len(shard), 4096):
        for i, image in enumerate(shard.read("images", start, min(start + 4096, len(shard)))):
            yield Item(f"{path}:{start + i}", image)
    shard.close()


def detect(
    detector: Detector,
    items: Iterable[Item],
    *,
    threshold: float = 0.5,
    batch_size: int = 256,
    on_error: Callable[[FakecifarError], None] | None = None,
    on_caution: Callable[[str, str], None] | None = None,
) -> Iterator[Verdict]:
    """Score items in batches, in input order; bad items go to `on_error`, not the output."""
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    names: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> Iterator[Verdict]:
        if batch:
            scores = detector.p_fake(np.stack(batch))
            for name, p in zip(names, scores):
                yield Verdict(name, "fake" if p >= threshold else "real", float(p))
            names.clear()
            batch.clear()

    size = detector.input_size
    for item in items:
        if item.error is not None:
            if on_error:
                on_error(item.error)
            continue
        image = item.image
        assert image is not None  # an item without an error has its pixels
        if on_caution and (why := detector.caution(image)):
            on_caution(item.path, why)
        if image.shape[:2] != size:
            image = resize_images(image[None], size)[0]
        names.append(item.path)
        batch.append(image)
        if len(batch) >= batch_size:
            yield from flush()
    yield from flush()
