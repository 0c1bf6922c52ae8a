"""Classification metrics from logits and labels, and the confusion-matrix heatmap.

numpy and pillow only (no torch): `eval` and `confusion` on an .onnx model run without torch.

    m = classification_metrics(logits, labels, classes)
    m["top1"], m["per_class"]["cat"]["f1"], m["macro"]["f2"], m["confusion"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UsageError


def f_beta(precision: float, recall: float, beta: float) -> float:
    """F-beta of one precision/recall pair (0 when both are 0)."""
    b2 = beta * beta
    denom = b2 * precision + recall
    return float((1 + b2) * precision * recall / denom) if denom > 0 else 0.0


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K]: row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    """Fraction of rows whose label is among the k largest logits (None if k >= classes)."""
    if len(labels) == 0 or k >= logits.shape[1]:
        return None
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1, top-5, per-class precision/recall/F1/F2/support, macro averages, confusion matrix.

    Macro averages are over the classes present in `labels` (support > 0), so a model with more
    classes than a dataset is not penalised for classes it was never shown."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    if logits.ndim != 2 or logits.shape[1] != k:
        raise UsageError(f"logits have shape {list(logits.shape)} for {k} classes")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise UsageError(f"labels outside 0..{k - 1}")
    predictions = logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64)
    cm = confusion_matrix(predictions, labels, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        per_class[name] = {
            "precision": float(p),
            "recall": float(r),
            "f1": f_beta(p, r, 1.0),
            "f2": f_beta(p, r, 2.0),
            "support": int(support[i]),
        }
    present = [name for i, name in enumerate(classes) if support[i] > 0]
    macro = {
        key: (float(np.mean([per_class[c][key] for c in present])) if present else 0.0)
        for key in ("precision", "recall", "f1", "f2")
    }
    n = int(len(labels))
    return {
        "images": n,
        "top1": float(tp.sum() / n) if n else 0.0,
        "top5": topk_accuracy(logits, labels, 5),
        "macro": macro,
        "per_class": per_class,
        "classes": list(classes),
        "confusion": cm,
    }


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def row_normalized(cm: np.ndarray) -> np.ndarray:
    """Each row as a fraction of its total (rows with no images stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, cm / np.where(totals == 0, 1, totals), 0.0)


# ----------------------------------------------------------------------------- heatmap


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):  # pragma: no cover - old Pillow / no FreeType
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _blues(t: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1): a sequential colour map readable in print and grey scale."""
    t = min(max(t, 0.0), 1.0)
    stops = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i

    def channel(c: int) -> int:
        return int(round(stops[i][c] + f * (stops[i + 1][c] - stops[i][c])))

    return channel(0), channel(1), channel(2)


def confusion_heatmap(
    cm: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    cell: int | None = None,
) -> Path:
    """Draw the row-normalized confusion matrix as a PNG: class names on both axes, each cell
    with its percentage and count, colour by the row-normalized value. Written atomically."""
    from PIL import Image, ImageDraw

    from .outputs import write_atomically

    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    frac = row_normalized(cm)
    cell = cell or (64 if k <= 12 else 52 if k <= 24 else 40)
    font = _font(max(10, cell // 4))
    small = _font(max(9, cell // 5))
    label_font = _font(max(11, cell // 4))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_size(probe, c, label_font)[0] for c in classes) + 12
    text_h = _text_size(probe, "Ag", label_font)[1]
    pad = 10
    title_h = text_h + 2 * pad if title else pad
    axis_h = text_h + 8
    left = pad + axis_h + name_w
    top = title_h + axis_h + name_w
    width = left + k * cell + pad
    height = top + k * cell + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        tw, _ = _text_size(draw, title, label_font)
        draw.text(((width - tw) // 2, pad), title, fill="black", font=label_font)
    # Axis titles.
    caption = "predicted"
    cw, _ = _text_size(draw, caption, label_font)
    draw.text((left + (k * cell - cw) // 2, title_h), caption, fill="black", font=label_font)
    vertical = Image.new("RGB", (_text_size(draw, "true", label_font)[0] + 4, text_h + 6), "white")
    ImageDraw.Draw(vertical).text((0, 0), "true", fill="black", font=label_font)
    vertical = vertical.rotate(90, expand=True)
    img.paste(vertical, (pad, top + (k * cell - vertical.height) // 2))
    # Class names: rows on the left, columns rotated on top.
    for i, name in enumerate(classes):
        tw, th = _text_size(draw, name, label_font)
        draw.text((left - tw - 6, top + i * cell + (cell - th) // 2 - 2), name, fill="black", font=label_font)
        label = Image.new("RGB", (tw + 4, text_h + 6), "white")
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=label_font)
        label = label.rotate(90, expand=True)
        img.paste(label, (left + i * cell + (cell - label.width) // 2, top - label.height - 4))
    # Cells.
    for i in range(k):
        for j in range(k):
            x0, y0 = left + j * cell, top + i * cell
            value = float(frac[i, j])
            colour = _blues(value)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(220, 220, 220))
            ink = "white" if value > 0.5 else "black"
            pct = f"{100 * value:.0f}%" if value >= 0.1 or value == 0 else f"{100 * value:.1f}%"
            count = str(int(cm[i, j]))
            pw, ph = _text_size(draw, pct, font)
            cw2, ch2 = _text_size(draw, count, small)
            gap = 2
            y = y0 + (cell - ph - ch2 - gap) // 2 - 2
            draw.text((x0 + (cell - pw) // 2, y), pct, fill=ink, font=font)
            draw.text((x0 + (cell - cw2) // 2, y + ph + gap + 2), count, fill=ink, font=small)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UsageError(f"{path}: directory {path.parent} does not exist")

    def write(fh) -> None:
        img.save(fh, format="PNG", optimize=True)

    return write_atomically(path, write)
