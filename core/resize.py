"""Resize shards: every image antialiased to a new size; every other column and attribute kept."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import UsageError
from .images import resize_images
from .shards import Shard, ShardWriter, expand_inputs, open_dataset_output, pixel_sha256, producer

# Attributes the writer sets itself; everything else on an input shard is carried over.
_MANAGED = {"format", "version", "classes", "created", "producer", "provenance"}


def _prefetch(shard: Shard, read_bytes: int = 16 << 20):
    """Yield blocks of whole chunks, reading the next block in a thread while the caller
    resizes this one (Pillow releases the GIL while resampling, so the two overlap). Two
    image buffers alternate, so no block pays for fresh memory."""
    h, w = shard.image_size
    rows = shard.chunk * max(1, read_bytes // (shard.chunk * h * w * 3))
    starts = list(range(0, len(shard), rows))
    buffers = [np.empty((min(rows, len(shard)), h, w, 3), np.uint8) for _ in range(2)]

    def read(start: int, buffer: np.ndarray) -> dict:
        stop = min(start + rows, len(shard))
        block = {name: shard.read(name, start, stop) for name in shard.columns if name != "images"}
        block["images"] = shard.read("images", start, stop, out=buffer)
        return block

    if not starts:  # an empty shard: no blocks
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fakecifar-read") as pool:
        pending = pool.submit(read, starts[0], buffers[0])
        for i, following in enumerate(starts[1:] + [None]):
            block = pending.result()
            if following is not None:
                pending = pool.submit(read, following, buffers[(i + 1) % 2])
            yield block


def resize_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    size: tuple[int, int],
    *,
    overwrite: bool = False,
    on_shard: Callable[[Path], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    allow_incomplete: bool = False,
) -> list[Path]:
    """Write OUT/<name>.h5 for each input shard, images resized to `size` (height, width).

    Inputs need not share a size or classes: each shard is resized on its own. A re-run with
    the same inputs and size after an interruption keeps the shards already finished.
    """
    paths = expand_inputs(inputs, allow_incomplete=allow_incomplete)
    if not paths:
        raise UsageError("no input shards", "give shard files or directories, or pipe their paths on stdin")
    names: dict[str, Path] = {}
    for p in paths:
        if p.name in names:
            raise UsageError(
                f"{p} and {names[p.name]} would both be written as {Path(out_dir) / p.name}",
                "resize them into separate -o directories",
            )
        names[p.name] = p
    for p in paths:
        if (Path(out_dir) / p.name).resolve() == p.resolve():
            raise UsageError(f"{p}: output would overwrite its own input", "choose another -o")
    shards = [Shard(p) for p in paths]  # validate every input before writing anything
    params = {"inputs": [str(p.resolve()) for p in paths], "size": list(size)}
    output = open_dataset_output(out_dir, command="resize", params=params, overwrite=overwrite)
    try:
        written = _resize_into(output, shards, size, on_shard, on_progress)
    except BaseException:
        output.close(failed=True)
        raise
    output.close()
    return written


def _resize_into(output, shards: list[Shard], size: tuple[int, int], on_shard, on_progress) -> list[Path]:
    done = {e["name"] for e in output.finished}
    written = []
    for shard in shards:
        target = output.directory / shard.path.name
        if shard.path.name in done:  # finished by an interrupted run with the same inputs
            written.append(target)
            if on_progress:
                on_progress(len(shard))
            if on_shard:
                on_shard(target)
            continue
        chain = json.loads(shard.attrs.get("provenance", "[]"))
        chain = (chain if isinstance(chain, list) else [chain]) + [
            {
                "step": "resize",
                "from": f"{shard.image_size[0]}x{shard.image_size[1]}",
                "to": f"{size[0]}x{size[1]}",
                "input": str(shard.path),
            }
        ]
        extra = {k: v for k, v in shard.attrs.items() if k not in _MANAGED}
        with ShardWriter(
            target,
            classes=shard.classes,
            image_size=size,
            producer=producer("resize"),
            provenance=chain,
            attrs=extra,
            overwrite=output.overwrite,
        ) as writer:
            for columns in _prefetch(shard):
                images = resize_images(columns.pop("images"), size)
                if "sha256" in columns:  # the duplicate key is a hash of the pixels: recompute it
                    columns["sha256"] = pixel_sha256(images)
                writer.add_batch(images, columns.pop("labels", None), **columns)
                if on_progress:
                    on_progress(len(images))
        shard.close()
        output.add(writer.path, writer.count)
        written.append(writer.path)
        if on_shard:
            on_shard(writer.path)
    # Inputs of several datasets (classes, sizes) may be resized together: the manifest names the first's.
    if not output.already_complete:
        output.finish(classes=shards[0].classes, image_size=size)
    return written
