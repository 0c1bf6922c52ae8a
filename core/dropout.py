"""Score every training image, drop the most harmful, write the kept ones: `fakecifar dropout`.

    from fakecifar.dropout import dropout
    from fakecifar.shards import open_shards
    report = dropout(open_shards(["fake/train"]), "kept", method="influence", drop="10%",
                     val=open_shards(["fake/val"]))
    report.shards, report.summary["per_class"]

The scores come from the registry of fakecifar.scores (one sign: larger = more harmful); the
`--drop` count (N or P%) is exact: the N highest scores, ties broken by row order. The kept
rows are copied with every column and every attribute their shards agree on, through the same
resumable, atomic dataset writer as `split` (manifest, lock, resume, --overwrite). Beside the
shards, OUT/ gets `report.json` (dropped per class and per origin, the score histogram, the
cost, the most harmful rows), `harmful.png` (a contact sheet of the most harmful images) and,
with `keep_scores`, `scores.npz`: one score per input row with the row's pixel sha256, so that
`scores_file=` filters again with another threshold without rescoring, and refuses scores of
another dataset. docs/dropout.md says why scores are a side file rather than a column.

A killed run resumes: scores are saved to OUT/scores.npz as soon as they exist (removed at the
end without `keep_scores`), proxies in OUT/.dropout-work/ are resumed by the training engine,
and the shards already written are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputExistsError, UsageError
from .outputs import utc_now, write_atomically
from .scores import (
    DEFAULT_DAMPING,
    DEFAULT_FOLDS,
    DIRECTION,
    SCORERS,
    ProxySpec,
    ScoreRequest,
    Scores,
    check_request,
    get_scorer,
    score,
)
from .shards import (
    ORIGIN_NAMES,
    ShardSeriesWriter,
    ShardSet,
    ShardWriter,
    open_dataset_output,
    producer,
    provenance_of,
    row_sha256,
)
from .shards import SUFFIX as SHARD_SUFFIX
from .text import format_classes, format_size

SCORES_FORMAT = "fakecifar-scores"
SCORES_VERSION = 1
SCORES_NAME = "scores.npz"
REPORT_NAME = "report.json"
SHEET_NAME = "harmful.png"
WORK_NAME = ".dropout-work"
DEFAULT_SHEET = 48
_MANAGED_ATTRS = {"format", "version", "classes", "created", "producer", "provenance"}


# ----------------------------------------------------------------------------- --drop


_DROP = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


def parse_drop(text: str | int) -> tuple[str, float]:
    """'500' -> ('count', 500), '10%' or '2.5%' -> ('percent', 10.0); refuses 0, 100% or more,
    fractional counts and anything else, with a hint."""
    hint = "give a count (--drop 500) or a percentage of the images (--drop 10%)"
    match = _DROP.match(str(text))
    if not match:
        raise UsageError(f"bad --drop {str(text)!r}", hint)
    number, percent = match[1], bool(match[2])
    value = float(number)
    if not percent and "." in number:
        raise UsageError(f"bad --drop {str(text)!r}: a count is a whole number of images", hint)
    if value == 0:
        raise UsageError(f"--drop {str(text).strip()} drops nothing", hint)
    if percent and value >= 100:
        raise UsageError(f"--drop {str(text).strip()} would drop every image", "give a percentage below 100%")
    return ("percent", value) if percent else ("count", float(int(number)))


def drop_count(spec: tuple[str, float], images: int) -> int:
    """The exact number of images a parsed --drop removes from `images` (P% rounds half up);
    refuses 0 and a count that leaves nothing."""
    kind, value = spec
    shown = f"{value:g}%" if kind == "percent" else f"{int(value)}"
    count = int(math.floor(value * images / 100 + 0.5)) if kind == "percent" else int(value)
    if count == 0:
        raise UsageError(f"--drop {shown} of {images} images is 0 images", "give a larger percentage, or a count")
    if count > images:
        raise UsageError(f"--drop {shown} is more than the {images} images of the data", f"give at most {images - 1}")
    if count == images:
        raise UsageError(f"--drop {shown} would drop all {images} images", f"give at most {images - 1}")
    return count


def drop_order(values: np.ndarray) -> np.ndarray:
    """Row indices from most to least harmful: score descending, ties by row index (stable)."""
    values = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(len(values)), -values))


# ----------------------------------------------------------------------------- scores files


def save_scores(path: Path, scores: Scores, hashes: np.ndarray, labels: np.ndarray, meta: dict) -> Path:
    """Write a scores file atomically: one score per row with its pixel sha256 and label."""
    n = len(scores.values)
    predicted = scores.predicted if scores.predicted is not None else np.full(n, -1)
    header = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "method": scores.method,
        "direction": DIRECTION,
        "created": utc_now(),
        "producer": producer("dropout"),
        "details": scores.details,
        "cost": scores.cost,
        **meta,
    }

    def write(fh) -> None:
        np.savez(
            fh,
            scores=np.asarray(scores.values, dtype=np.float64),
            sha256=np.asarray(hashes, dtype="S32"),
            labels=np.asarray(labels, dtype=np.int16),
            predicted=np.asarray(predicted, dtype=np.int16),
            meta=np.array(json.dumps(header, default=_json_default)),
        )

    return write_atomically(Path(path), write)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    return str(obj)


def read_scores(path: str | os.PathLike) -> tuple[Scores, dict, dict[str, np.ndarray]]:
    """(scores, header, arrays) of a scores file; refuses what is not one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--scores {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("scores", "sha256", "labels", "predicted", "meta")}
        header = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise UsageError(
            f"--scores {path}: not a fakecifar scores file ({type(exc).__name__})",
            "give the scores.npz that `fakecifar dropout --keep-scores` wrote",
        ) from None
    if not isinstance(header, dict) or header.get("format") != SCORES_FORMAT:
        raise UsageError(f"--scores {path}: not a fakecifar scores file", "give a scores.npz written by dropout")
    if int(header.get("version", 0)) > SCORES_VERSION:
        raise UsageError(f"--scores {path}: version {header.get('version')} is newer than this fakecifar reads")
    n = len(arrays["scores"])
    if any(len(arrays[k]) != n for k in ("sha256", "labels", "predicted")) or not np.isfinite(arrays["scores"]).all():
        raise UsageError(f"--scores {path}: damaged scores file", "score the data again (drop --scores)")
    predicted = arrays["predicted"].astype(np.int64)
    scores = Scores(
        str(header.get("method", "?")),
        arrays["scores"].astype(np.float64),
        None if (predicted < 0).all() else predicted,
        dict(header.get("details") or {}),
        dict(header.get("cost") or {}),
    )
    return scores, header, arrays


def check_scores_match(path: Path, header: dict, arrays: dict, data: ShardSet, hashes: np.ndarray, labels) -> None:
    """Refuse scores of another dataset: the rows must match one for one, by pixel hash and label."""
    hint = "score these shards again (drop --scores), or give the scores file written for them"
    n = len(arrays["scores"])
    if n != len(data):
        raise UsageError(f"--scores {path}: scores of {n} images, the data has {len(data)}", hint)
    if list(header.get("classes") or []) != list(data.classes):
        raise UsageError(
            f"--scores {path}: scores of classes {format_classes(header.get('classes') or [])}, the data has "
            f"{format_classes(data.classes)}",
            hint,
        )
    differ = np.nonzero(arrays["sha256"] != hashes)[0]
    if len(differ):
        raise UsageError(
            f"--scores {path}: scores are of another dataset: {len(differ)} of {n} rows have other pixels "
            f"(first: row {int(differ[0])}, {_where(data, int(differ[0]))})",
            hint,
        )
    relabelled = np.nonzero(arrays["labels"].astype(np.int64) != labels)[0]
    if len(relabelled):
        raise UsageError(
            f"--scores {path}: {len(relabelled)} rows have another label than when scored "
            f"(first: row {int(relabelled[0])}, {_where(data, int(relabelled[0]))})",
            hint,
        )


def _where(data: ShardSet, row: int) -> str:
    k = int(np.searchsorted(data.offsets, row, side="right") - 1)
    return f"{data.shards[k].path} image {row - int(data.offsets[k])}"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the report


def histogram(values: np.ndarray, dropped: np.ndarray, bins: int = 12) -> dict:
    """Counts of scores in `bins` equal bins between the 0.5% and 99.5% quantiles (the first and
    last bins also hold everything beyond: scores are heavy-tailed), with the dropped among them."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"edges": [], "counts": [], "dropped": [], "open_ends": True}
    lo, hi = (float(v) for v in np.quantile(values, [0.005, 0.995]))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    dropped_counts = np.bincount(which[dropped], minlength=bins)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "dropped": [int(c) for c in dropped_counts],
        "open_ends": True,
    }


def histogram_lines(hist: dict, width: int = 40) -> list[str]:
    """The histogram as text lines: range, count, bar ('#' kept, 'x' dropped)."""
    counts, dropped, edges = hist["counts"], hist["dropped"], hist["edges"]
    if not counts:
        return []
    top = max(counts) or 1
    lines = []
    for i, (c, d) in enumerate(zip(counts, dropped)):
        lo = "" if i == 0 else f"{edges[i]:.3g}"
        hi = "" if i == len(counts) - 1 else f"{edges[i + 1]:.3g}"
        bar_all = int(round(width * c / top)) if c else 0
        bar_drop = min(bar_all, int(math.ceil(width * d / top))) if d else 0
        bar = "#" * (bar_all - bar_drop) + "x" * bar_drop
        lines.append(f"  {lo:>10} .. {hi:<10} {c:>8,}  {bar}" + (f"  ({d:,} dropped)" if d else ""))
    return lines


def report_lines(summary: dict) -> list[str]:
    """The human report (for stderr): what was dropped, per class and origin, the histogram,
    the cost and where the files are."""
    n, k = summary["images"], summary["dropped"]
    cost = summary.get("cost") or {}
    lines = [
        f"dropped {k:,} of {n:,} images ({100 * k / max(n, 1):.2f}%) by {summary['method']} "
        f"(scores >= {summary['threshold']:.4g}; {summary['direction']}), kept {summary['kept']:,}"
    ]
    details = summary.get("details") or {}
    if "flagged" in details:
        lines.append(f"confident learning flags {details['flagged']:,} images as likely label errors")
    lines.append("dropped per class:")
    width = max([len(r["name"]) for r in summary["per_class"]] + [5])
    for r in summary["per_class"]:
        share = 100 * r["dropped"] / r["images"] if r["images"] else 0.0
        lines.append(f"  {r['name']:<{width}} {r['dropped']:>7,} of {r['images']:>7,}  {share:6.2f}%")
    if summary.get("per_origin"):
        lines.append("dropped per origin:")
        for r in summary["per_origin"]:
            share = 100 * r["dropped"] / r["images"] if r["images"] else 0.0
            lines.append(f"  {r['name']:<{width}} {r['dropped']:>7,} of {r['images']:>7,}  {share:6.2f}%")
    lines.append(f"scores ({summary['direction']}; x = dropped):")
    lines.extend(histogram_lines(summary["histogram"]))
    spent = f"cost: {cost.get('seconds', 0):.1f} s, {cost.get('images_scored', n):,} images scored"
    if cost.get("models_trained"):
        spent += (
            f", {cost['models_trained']} model(s) trained for {cost.get('training_epochs', 0)} epoch(s) "
            f"({cost.get('training_image_epochs', 0):,} image-epochs)"
        )
    if cost.get("forward_images"):
        spent += f", {cost['forward_images']:,} images forwarded"
    if summary.get("scores_from") == "file":
        spent += f" (when scored; now read from {summary.get('scores_input')})"
    lines.append(spent)
    if summary.get("sheet"):
        lines.append(f"the {summary['sheet_images']} most harmful images: {summary['sheet']}")
    if summary.get("scores"):
        lines.append(f"scores kept in {summary['scores']} (filter again: --scores {summary['scores']} --drop N)")
    lines.append(f"report: {summary['report']}")
    return lines


# ----------------------------------------------------------------------------- the contact sheet

SHEET_COLUMNS = 8  # cells per row (fewer when fewer images)
SHEET_PAD = 8  # margin around the sheet
SHEET_GAP = 8  # between cells
SHEET_LINE = 15  # pixels per caption line (font SHEET_FONT)
SHEET_FONT = 12
SHEET_CAPTION_LINES = 3
SHEET_MIN_IMAGE = 96  # images are upscaled (nearest, integer factor >= 3) to at least this
SHEET_MIN_CELL = 136  # a cell is at least this wide, for its captions
SHEET_HEADER = 2 * SHEET_LINE + 6


def sheet_geometry(count: int, image_size: Sequence[int]) -> dict[str, int]:
    """Layout of a contact sheet of `count` images of `image_size` (HxW), in pixels."""
    h, w = int(image_size[0]), int(image_size[1])
    scale = max(3, -(-SHEET_MIN_IMAGE // max(h, w)))
    cell_w = max(scale * w, SHEET_MIN_CELL)
    cell_h = scale * h + SHEET_CAPTION_LINES * SHEET_LINE + 4
    cols = max(1, min(SHEET_COLUMNS, count))
    rows = max(1, -(-count // cols))
    return {
        "scale": scale,
        "cell_w": cell_w,
        "cell_h": cell_h,
        "cols": cols,
        "rows": rows,
        "width": 2 * SHEET_PAD + cols * cell_w + (cols - 1) * SHEET_GAP,
        "height": 2 * SHEET_PAD + SHEET_HEADER + rows * cell_h + (rows - 1) * SHEET_GAP,
    }


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def contact_sheet(images: np.ndarray, captions: Sequence[Sequence[str]], title: Sequence[str], path: Path) -> Path:
    """Draw `images` (uint8 [K,H,W,3]) in a grid, each upscaled (nearest) with its caption lines
    underneath and `title` lines on top; write it as a PNG atomically."""
    from PIL import Image, ImageDraw

    geo = sheet_geometry(len(images), images.shape[1:3])
    sheet = Image.new("RGB", (geo["width"], geo["height"]), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(SHEET_FONT)
    for i, line in enumerate(title[:2]):
        draw.text((SHEET_PAD, SHEET_PAD + i * SHEET_LINE), _fit(draw, line, font, geo["width"] - 2 * SHEET_PAD),
                  fill="black", font=font)  # fmt: skip
    scale, (h, w) = geo["scale"], images.shape[1:3]
    for i, (image, lines) in enumerate(zip(images, captions)):
        r, c = divmod(i, geo["cols"])
        x = SHEET_PAD + c * (geo["cell_w"] + SHEET_GAP)
        y = SHEET_PAD + SHEET_HEADER + r * (geo["cell_h"] + SHEET_GAP)
        big = Image.fromarray(np.ascontiguousarray(image)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        sheet.paste(big, (x, y))
        for j, line in enumerate(list(lines)[:SHEET_CAPTION_LINES]):
            draw.text((x, y + h * scale + 2 + j * SHEET_LINE), _fit(draw, line, font, geo["cell_w"]), fill="black",
                      font=font)  # fmt: skip
    return write_atomically(Path(path), lambda fh: sheet.save(fh, format="PNG"))


# ----------------------------------------------------------------------------- writing the kept rows


class _KeptWriter(ShardSeriesWriter):
    """A ShardSeriesWriter whose shards carry the input's own attributes too (every attribute
    the input shards agree on, beside the managed ones)."""

    def __init__(self, *args: Any, attrs: dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.attrs = dict(attrs or {})

    def _current(self) -> ShardWriter:
        if self._writer is None:
            self._writer = ShardWriter(
                self.out_dir / f"{self.prefix}-{self.index:05d}{SHARD_SUFFIX}",
                classes=self.classes,
                image_size=self.image_size,
                producer=self.producer,
                provenance=self.provenance,
                attrs=self.attrs,
                overwrite=self.overwrite,
                compression=self.compression,
            )
        return self._writer


def shared_attrs(data: ShardSet) -> dict:
    """The non-managed root attributes with one value in every shard of `data`."""
    first = {k: v for k, v in data.shards[0].attrs.items() if k not in _MANAGED_ATTRS}
    out = {}
    for key, value in first.items():
        if all(_same(s.attrs.get(key, _MISSING), value) for s in data.shards[1:]):
            out[key] = value
    return out


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.all(np.asarray(a) == np.asarray(b))) and np.shape(a) == np.shape(b)
    except Exception:  # noqa: BLE001 - attributes of odd types: not the same
        return False


def _write_kept(output, data: ShardSet, keep: np.ndarray, *, shard_size: int, chain: list, on_shard) -> None:
    done = output.finished_images  # kept rows an interrupted run already wrote
    if on_shard:
        for path in output.finished_paths:
            on_shard(path)
    writer = _KeptWriter(
        output.directory,
        shard_size=shard_size,
        classes=data.classes,
        image_size=data.image_size,
        producer=producer("dropout"),
        provenance=chain,
        overwrite=output.overwrite,
        on_shard=on_shard,
        dataset=output,
        attrs=shared_attrs(data),
    )
    try:
        taken = 0
        for start, chunk in data.iter_chunks(data.columns):
            index = np.nonzero(keep[start : start + len(chunk["images"])])[0]
            skip = max(0, min(len(index), done - taken))
            taken += len(index)
            index = index[skip:]
            if len(index):
                piece = {k: v[index] for k, v in chunk.items()}
                writer.add_batch(piece.pop("images"), piece.pop("labels"), **piece)
        writer.close()
    except BaseException:
        writer.abort()
        raise


# ----------------------------------------------------------------------------- the command


@dataclass
class DropoutReport:
    directory: Path
    shards: list[Path]
    summary: dict  # what OUT/report.json holds
    already_complete: bool = False
    resumed_images: int = 0
    scores_from: str = "scored"  # scored | file | resumed (OUT/scores.npz of an interrupted run)


def check_val(val: ShardSet, data: ShardSet) -> None:
    """--val must be labelled images of the training data's classes and size."""
    if list(val.classes) != list(data.classes):
        raise UsageError(
            f"--val {val.paths[0]}: classes {format_classes(val.classes)} differ from the training data's "
            f"{format_classes(data.classes)}",
            "give validation shards of the same dataset (fakecifar split)",
        )
    if tuple(val.image_size) != tuple(data.image_size):
        raise UsageError(
            f"--val {val.paths[0]}: images are {format_size(val.image_size)}, the training data's "
            f"{format_size(data.image_size)}",
            "resize one of them (fakecifar resize)",
        )
    val_labels = val.read("labels")
    if not (val_labels >= 0).any():
        raise UsageError(f"--val {val.paths[0]}: no image is labelled", "give labelled validation shards")
    if (val_labels >= len(data.classes)).any():
        raise UsageError(f"--val {val.paths[0]}: a label is beyond its {len(data.classes)} classes", "recreate it")


def dropout(
    data: ShardSet,
    out_dir: str | os.PathLike,
    *,
    drop: str | int,
    method: str | None = None,
    val: ShardSet | None = None,
    model: str | os.PathLike | None = None,
    scores_file: str | os.PathLike | None = None,
    dynamics: str | os.PathLike | None = None,
    snapshots: str | os.PathLike | None = None,
    proxy: ProxySpec | None = None,
    folds: int = DEFAULT_FOLDS,
    damping: float = DEFAULT_DAMPING,
    seed: int = 0,
    device: str = "auto",
    keep_scores: bool = False,
    sheet: int = DEFAULT_SHEET,
    shard_size: int = 10_000,
    overwrite: bool = False,
    on_shard: Callable[[Path], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DropoutReport:
    """Score `data` by `method` (or read `scores_file`), drop the `drop` most harmful images
    (a count, or 'P%'), and write the kept ones to `out_dir` with the report and contact sheet.
    Everything that can be refused is refused before the output is touched."""
    # ---- refusals, before any output exists
    spec = parse_drop(drop)
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    if sheet < 0:
        raise UsageError(f"--sheet must be 0 (none) or more, got {sheet}")
    labels = data.read("labels").astype(np.int64)
    unlabelled = np.nonzero(labels < 0)[0]
    if len(unlabelled):
        raise UsageError(
            f"{_where(data, int(unlabelled[0]))}: {len(unlabelled)} image(s) have no label, and scores need one",
            "give labelled shards",
        )
    beyond = np.nonzero(labels >= len(data.classes))[0]
    if len(beyond):
        raise UsageError(
            f"{_where(data, int(beyond[0]))}: label {int(labels[beyond[0]])} is beyond the "
            f"{len(data.classes)} classes of the shards",
            "the shard is damaged; recreate it",
        )
    if val is not None:
        check_val(val, data)
    count = drop_count(spec, len(data))
    out = Path(out_dir)
    proxy = proxy or ProxySpec()
    loaded = None
    hashes = None
    scorer = None
    req: ScoreRequest | None = None
    if scores_file is not None:
        scores_file = Path(scores_file)
        given_scores, header, arrays = read_scores(scores_file)
        if method is not None and get_scorer(method).name != given_scores.method:
            raise UsageError(
                f"--scores {scores_file} holds {given_scores.method} scores, not {method}",
                "drop --score (the file says the method)",
            )
        if model is not None or proxy.given() or dynamics is not None or snapshots is not None:
            raise UsageError(
                "--scores reads scores: --model, --dynamics, --snapshots and --proxy-* would score again", "drop them"
            )
        hashes = row_sha256(data)
        check_scores_match(scores_file, header, arrays, data, hashes, labels)
        loaded = (given_scores, header)
        method = given_scores.method
    else:
        if method is None:
            raise UsageError("no --score method", f"give --score {'|'.join(SCORERS)}, or --scores FILE")
        scorer = get_scorer(method)
        method = scorer.name
        req = ScoreRequest(
            data,
            labels=labels,
            val=val,
            model=Path(model) if model is not None else None,
            proxy=proxy,
            folds=folds,
            damping=damping,
            seed=seed,
            device=device,
            on_message=on_message,
            on_epoch=on_epoch,
            on_step=on_step,
            dynamics=Path(dynamics) if dynamics is not None else None,
            snapshots=Path(snapshots) if snapshots is not None else None,
        )
        check_request(scorer, req)

    scoring = {
        "inputs": [str(p.resolve()) for p in data.paths],
        "images": len(data),
        "method": method,
    }
    if loaded is not None:
        assert isinstance(scores_file, Path)
        scoring.update(scores=str(scores_file.resolve()), scores_digest=_file_digest(scores_file))
    else:
        assert scorer is not None
        scoring.update(seed=seed)
        if scorer.needs_val or val is not None:
            scoring["val"] = [str(p.resolve()) for p in val.paths] if val is not None else None
        if scorer.uses_model:
            scoring["model"] = str(Path(model).resolve()) if model is not None else None
            scoring["device"] = device
            if model is None:
                scoring["proxy"] = proxy.resolved()
        for kind, path in (("dynamics", dynamics), ("snapshots", snapshots)):
            if path is not None:
                scoring[kind] = str(Path(path).resolve())
        if scorer.folds and model is None:
            scoring["folds"] = folds
        if scorer.name == "influence":
            scoring["damping"] = damping
    params = {**scoring, "drop": count, "shard_size": shard_size, "keep_scores": keep_scores, "sheet": sheet}

    output = open_dataset_output(out, command="dropout", params=params, overwrite=overwrite)
    try:
        report = _run(
            output, data, labels, count, str(drop).strip(), scoring, loaded, scores_file, hashes,
            req, keep_scores, sheet, shard_size, on_shard, on_message,
        )  # fmt: skip
    except BaseException:
        output.close(failed=True)
        raise
    output.close()
    return report


def _run(
    output, data, labels, count, drop_text, scoring, loaded, scores_file, hashes, req, keep_scores, sheet,
    shard_size, on_shard, on_message,
) -> DropoutReport:  # fmt: skip
    out = output.directory
    scores_path, report_path, sheet_path, work = out / SCORES_NAME, out / REPORT_NAME, out / SHEET_NAME, out / WORK_NAME
    if output.already_complete:
        try:
            summary = json.loads(report_path.read_text())
        except (OSError, ValueError):
            summary = {}
        if on_shard:
            for path in output.finished_paths:
                on_shard(path)
        return DropoutReport(out, output.finished_paths, summary, already_complete=True)
    if output.overwrite:
        shutil.rmtree(work, ignore_errors=True)
    elif not output.finished:
        existing = [p.name for p in (report_path, sheet_path) if p.exists()]
        if existing:
            raise OutputExistsError(
                f"{out} already holds {', '.join(existing)} of another run",
                "pass --overwrite to replace them, or choose another -o",
            )

    # ---- the scores: given, left by an interrupted run with the same scoring, or made now
    scores: Scores | None = None
    scores_from = "scored"
    own_file = scores_file is not None and scores_path.resolve() == Path(scores_file).resolve()
    if loaded is not None:
        scores, scores_from = loaded[0], "file"
    elif scores_path.exists() and not output.overwrite:
        try:
            scores, header, arrays = read_scores(scores_path)
        except UsageError:
            scores, header, arrays = None, {}, {}
        if scores is None or header.get("scoring") != json.loads(json.dumps(scoring)):
            if output.finished:
                raise OutputExistsError(
                    f"cannot resume: {scores_path} holds scores of other arguments",
                    "pass --overwrite to start again, or choose another -o",
                )
            scores = None  # a stale file of an interrupted run with other scoring: rescore
        else:
            hashes = row_sha256(data)
            check_scores_match(scores_path, header, arrays, data, hashes, labels)
            scores_from = "resumed"
    if scores is None:
        if output.finished:
            raise OutputExistsError(
                f"cannot resume: {out} holds shards of an interrupted run but not the {SCORES_NAME} they were "
                "selected by",
                "pass --overwrite to start again, or choose another -o",
            )
        assert req is not None
        req.work_dir = work
        scores = score(scoring["method"], req)
        hashes = row_sha256(data) if hashes is None else hashes
        save_scores(scores_path, scores, hashes, labels, _scores_meta(data, scoring))
        shutil.rmtree(work, ignore_errors=True)
    elif loaded is not None and keep_scores and not own_file:
        hashes = row_sha256(data) if hashes is None else hashes
        save_scores(scores_path, scores, hashes, labels, _scores_meta(data, scoring, loaded[1]))

    # ---- the drop, the kept shards, the report
    order = drop_order(scores.values)
    dropped_rows = order[:count]
    keep = np.ones(len(data), bool)
    keep[dropped_rows] = False
    digest = hashlib.sha256(np.ascontiguousarray(scores.values).tobytes()).hexdigest()[:16]
    chain = provenance_of(data.shards) + [
        {
            "step": "dropout",
            "method": scores.method,
            "dropped": int(count),
            "kept": int(len(data) - count),
            "of": int(len(data)),
            "threshold": float(scores.values[dropped_rows[-1]]),
            "scores_sha256": digest,
            "inputs": [str(p) for p in data.paths],
        }
    ]
    resumed = output.finished_images
    _write_kept(output, data, keep, shard_size=shard_size, chain=chain, on_shard=on_shard)
    summary = _summary(data, labels, scores, dropped_rows, count, drop_text)
    summary.update(
        scores_from=scores_from,
        scores_input=str(scores_file) if scores_file is not None else None,
        shards=[str(p) for p in output.finished_paths],
        report=str(report_path),
        scores=str(scores_path) if keep_scores or own_file else None,
        sheet=None,
        sheet_images=0,
    )
    top = dropped_rows[: min(sheet, count)]
    if len(top):
        images = data.take("images", top)
        contact_sheet(images, _captions(data, labels, scores, top), _title(summary, len(top)), sheet_path)
        summary.update(sheet=str(sheet_path), sheet_images=int(len(top)))
    else:
        sheet_path.unlink(missing_ok=True)
    write_atomically(
        report_path, lambda fh: fh.write((json.dumps(summary, indent=1, default=_json_default) + "\n").encode())
    )
    output.finish(classes=data.classes, image_size=data.image_size)
    if not keep_scores and not own_file:
        scores_path.unlink(missing_ok=True)
    return DropoutReport(out, output.finished_paths, summary, resumed_images=resumed, scores_from=scores_from)


def _scores_meta(data: ShardSet, scoring: dict, header: dict | None = None) -> dict:
    meta = {
        "classes": list(data.classes),
        "image_size": list(data.image_size),
        "images": len(data),
        "inputs": [str(p) for p in data.paths],
        "scoring": scoring,
    }
    if header is not None:  # a copy of a given file: keep where it came from
        meta["copied_from"] = {k: header.get(k) for k in ("created", "inputs", "scoring")}
    return meta


def _summary(data: ShardSet, labels: np.ndarray, scores: Scores, dropped_rows: np.ndarray, count: int, drop_text: str):
    dropped = np.zeros(len(data), bool)
    dropped[dropped_rows] = True
    per_class = [
        {"name": name, "images": int((labels == j).sum()), "dropped": int((dropped & (labels == j)).sum())}
        for j, name in enumerate(data.classes)
    ]
    per_origin = None
    if "origin" in data.columns:
        origin = data.read("origin").astype(np.int64)
        per_origin = []
        for value in np.unique(origin):
            name = ORIGIN_NAMES[value] if 0 <= value < len(ORIGIN_NAMES) else f"origin {value}"
            rows = origin == value
            per_origin.append({"name": name, "images": int(rows.sum()), "dropped": int((dropped & rows).sum())})
    return {
        "method": scores.method,
        "direction": DIRECTION,
        "drop": drop_text,
        "images": int(len(data)),
        "dropped": int(count),
        "kept": int(len(data) - count),
        "threshold": float(scores.values[dropped_rows[-1]]),
        "per_class": per_class,
        "per_origin": per_origin,
        "histogram": histogram(scores.values, dropped),
        "cost": scores.cost,
        "details": scores.details,
        "top": _top(data, labels, scores, dropped_rows[:100]),
    }


def _top(data: ShardSet, labels: np.ndarray, scores: Scores, rows: np.ndarray) -> list[dict]:
    origin = data.take("origin", rows) if "origin" in data.columns and len(rows) else None
    out = []
    for i, row in enumerate(rows):
        k = int(np.searchsorted(data.offsets, row, side="right") - 1)
        entry = {
            "rank": i + 1,
            "row": int(row),
            "shard": str(data.shards[k].path),
            "index": int(row - data.offsets[k]),
            "label": data.classes[int(labels[row])],
            "score": float(scores.values[row]),
        }
        if origin is not None:
            entry["origin"] = _origin_name(int(origin[i]))
        if scores.predicted is not None and scores.predicted[row] >= 0:
            entry["predicted"] = data.classes[int(scores.predicted[row])]
        out.append(entry)
    return out


def _origin_name(value: int) -> str:
    return ORIGIN_NAMES[value] if 0 <= value < len(ORIGIN_NAMES) else f"origin {value}"


def _captions(data: ShardSet, labels: np.ndarray, scores: Scores, rows: np.ndarray) -> list[list[str]]:
    origin = data.take("origin", rows) if "origin" in data.columns else None
    out = []
    for i, row in enumerate(rows):
        first = f"#{i + 1} {data.classes[int(labels[row])]}"
        if origin is not None:
            first += f" ({_origin_name(int(origin[i]))})"
        if scores.predicted is not None and scores.predicted[row] >= 0:
            second = f"model: {data.classes[int(scores.predicted[row])]}"
        else:
            second = f"row {int(row)}"
        out.append([first, second, f"score {scores.values[row]:.4g}"])
    return out


def _title(summary: dict, shown: int) -> list[str]:
    return [
        f"fakecifar dropout: the {shown} most harmful of {summary['images']:,} images by {summary['method']} "
        f"({summary['dropped']:,} dropped)",
        "under each: rank and given label (origin), the model's class, score (larger = more harmful)",
    ]
