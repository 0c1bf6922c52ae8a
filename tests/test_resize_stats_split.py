"""resize, stats and split through the real CLI, and the three chained in a real shell pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from fakecifar.shards import Shard, open_shards, pixel_sha256

from helpers import CLASSES3, SHARED_DATA, needs_shared_data, random_images


def test_resize_keeps_columns_and_attributes_and_matches_pillow_lanczos(cli, make_shard, tmp_path):
    images = random_images(20, (32, 32))
    src = make_shard("a.h5", images=images, origin=np.ones(20), prompt=[f"p{i}" for i in range(20)], manifest=False)
    with h5py.File(src, "a") as f:
        f.attrs["note"] = "kept"
    result = cli("resize", src, "--size", "16", "-o", tmp_path / "small")
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(tmp_path / "small" / "a.h5")]
    out = Shard(tmp_path / "small" / "a.h5")
    assert out.image_size == (16, 16) and out.attrs["note"] == "kept" and out.classes == CLASSES3
    assert out.read("prompt").tolist() == [f"p{i}" for i in range(20)]
    assert np.array_equal(out.read("labels"), Shard(src).read("labels"))
    resized = out.read("images")
    assert np.array_equal(out.read("sha256"), pixel_sha256(resized))  # the pixel key follows the pixels
    reference = np.stack([np.asarray(Image.fromarray(i).resize((16, 16), Image.Resampling.LANCZOS)) for i in images])
    assert np.abs(resized.astype(int) - reference).mean() < 1.0
    chain = json.loads(out.attrs["provenance"])
    assert chain[-1]["step"] == "resize" and chain[-1]["to"] == "16x16"


def test_resize_upscales_and_refuses_name_collisions(cli, make_shard, tmp_path):
    a = make_shard("x.h5", directory=tmp_path)
    (tmp_path / "other").mkdir()
    b = make_shard("x.h5", directory=tmp_path / "other")
    up = cli("resize", a, "--size", "12x20", "-o", tmp_path / "up")
    assert up.exit_code == 0 and Shard(tmp_path / "up" / "x.h5").image_size == (12, 20)
    clash = cli("resize", a, b, "--size", "4", "-o", tmp_path / "clash")
    assert clash.exit_code == 2 and "would both be written" in clash.stderr
    bad = cli("resize", a, "--size", "big", "-o", tmp_path / "z")
    assert bad.exit_code == 2 and "bad size 'big'" in bad.stderr


def test_resize_of_an_empty_shard_writes_an_empty_shard(cli, make_shard, tmp_path):
    src = make_shard("e.h5", n=0, size=(8, 8))
    result = cli("resize", src, "--size", "4", "-o", tmp_path / "small")
    assert result.exit_code == 0, result.stderr
    out = Shard(tmp_path / "small" / "e.h5")
    assert len(out) == 0 and out.image_size == (4, 4)


def test_stats_match_numpy_on_the_same_pixels(cli, make_shard):
    images = random_images(500, (8, 8), seed=4)
    path = make_shard("a.h5", images=images)
    result = cli("stats", path, "--json")
    assert result.exit_code == 0
    (stats,) = result.json_lines()
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(stats["mean"], pixels.mean(axis=0), atol=1e-6)
    assert np.allclose(stats["std"], pixels.std(axis=0), atol=1e-6)
    assert stats["images"] == 500 and stats["per_class"] == {"cat": 167, "dog": 167, "frog": 166}


def test_stats_counts_duplicates_and_compares_datasets_side_by_side(cli, make_shard, tmp_path):
    images = random_images(10)
    images[5:] = images[0]  # five copies of one image
    dup = make_shard("dup.h5", images=images)
    other = make_shard("other.h5", n=7, seed=9, origin=np.array([0, 0, 0, 1, 1, 1, 1]))
    table = cli("stats", dup, other)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert str(dup) in lines[0] and str(other) in lines[0]
    assert any(line.startswith("exact duplicates") and line.split()[2:] == ["5", "0"] for line in lines)
    by = cli("stats", other, "--by", "origin", "--json").json_lines()
    assert [s["images"] for s in by] == [3, 4] and by[0]["name"].endswith("[real]")
    missing = cli("stats", dup, "--by", "origin")
    assert missing.exit_code == 2 and "no origin column" in missing.stderr


def test_stats_reads_one_dataset_from_stdin(cli, make_shard):
    a, b = make_shard("a.h5", n=5), make_shard("b.h5", n=6, seed=3)
    result = cli("stats", "--json", stdin=f"{a}\n{b}\n")
    assert result.exit_code == 0 and result.json_lines()[0]["images"] == 11


def test_bad_shards_are_one_line_errors_in_every_reader(cli, tmp_path, make_shard):
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"not hdf5 at all")
    good = make_shard("good.h5", manifest=False)
    for args in (
        ["stats", fake],
        ["resize", good, fake, "--size", "4", "-o", tmp_path / "r"],
        ["split", fake, "-o", tmp_path / "s"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "fake.h5: not an HDF5 file" in lines[0], result.stderr
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.h5"))
    mixed = cli("stats", "--json", stdin=f"{good}\n{make_shard('big.h5', size=(16, 16), manifest=False)}\n")
    assert mixed.exit_code == 2 and "big.h5: images are 16x16" in mixed.stderr


def test_split_is_stratified_seeded_and_disjoint(cli, make_shard, tmp_path):
    labels = np.repeat([0, 1, 2], [60, 30, 12])
    images = random_images(len(labels), seed=11)
    images[1] = images[0]  # twins must stay together
    src = make_shard("a.h5", images=images, labels=labels)
    result = cli("split", src, "--ratio", "5:1", "--seed", "3", "-o", tmp_path / "s")
    assert result.exit_code == 0, result.stderr
    train, val = open_shards([tmp_path / "s" / "train"]), open_shards([tmp_path / "s" / "val"])
    assert len(train) + len(val) == len(labels)
    assert np.bincount(val.read("labels"), minlength=3).tolist() in ([10, 5, 2], [9, 5, 2], [10, 5, 2])
    assert not set(train.read("sha256").tolist()) & set(val.read("sha256").tolist())
    again = cli("split", src, "--ratio", "5:1", "--seed", "3", "-o", tmp_path / "t")
    assert again.exit_code == 0
    assert np.array_equal(open_shards([tmp_path / "t" / "val"]).read("images"), val.read("images"))
    other = cli("split", src, "--val", "0.5", "--seed", "4", "-o", tmp_path / "u")
    assert other.exit_code == 0 and len(open_shards([tmp_path / "u" / "val"])) in range(48, 53)
    both = cli("split", src, "--ratio", "5:1", "--val", "0.2", "-o", tmp_path / "v")
    assert both.exit_code == 2 and "not both" in both.stderr


def test_the_pipe_import_resize_stats_in_a_real_shell(image_folder, tmp_path):
    exe = f"{sys.executable} -m fakecifar"
    cmd = (
        f"set -o pipefail; {exe} import {image_folder} -o {tmp_path}/raw --shard-size 5 "
        f"| {exe} resize --size 4 -o {tmp_path}/small | {exe} stats --json"
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["images"] == 12 and stats["image_size"] == [4, 4] and stats["shards"] == 3


@pytest.mark.slow  # ~30 s on 2 cores; `make test-slow` (run by .ci/run too)
@needs_shared_data
def test_cifar10_stats_match_numpy_to_four_decimals(tmp_path):
    """Done-when of issue 2: the real CIFAR-10 training set, stats vs numpy on the same pixels."""
    from fakecifar.importing import import_sources
    from fakecifar.stats import dataset_stats

    import_sources([SHARED_DATA / "cifar10-train-jpg.tar.gz"], tmp_path / "raw", shard_size=25_000)
    data = open_shards([tmp_path / "raw"])
    (stats,) = dataset_stats(data, "cifar10")
    pixels = data.read("images").reshape(-1, 3).astype(np.float64) / 255
    assert stats.images == 50_000 and set(stats.per_class.values()) == {5000}
    assert np.round(stats.mean, 4).tolist() == np.round(pixels.mean(axis=0), 4).tolist()
    assert np.round(stats.std, 4).tolist() == np.round(pixels.std(axis=0), 4).tolist()
