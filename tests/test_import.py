"""`fakecifar import`: every layout, every bad input, driven through the real CLI."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from fakecifar.shards import open_shards

from helpers import CLASSES3, one_error_line, random_images, write_image


def _err(result, *needles):
    one_error_line(result, *needles, command="import")


def test_image_folder_becomes_shards_with_exact_pixels(cli, image_folder, tmp_path):
    out = tmp_path / "raw"
    result = cli("import", image_folder, "-o", out, "--shard-size", "5")
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out / f"shard-{i:05d}.h5") for i in range(3)]
    data = open_shards([out])
    assert data.classes == CLASSES3 and len(data) == 12 and data.image_size == (8, 8)
    sources = data.read("source")
    images, labels = data.read("images"), data.read("labels")
    from PIL import Image

    for img, label, src in zip(images, labels, sources):
        assert np.array_equal(img, np.asarray(Image.open(src).convert("RGB")))
        assert CLASSES3[label] == os.path.basename(os.path.dirname(src))
    assert "imported 12 images (8x8, 3 classes) into 3 shard(s)" in result.stderr


def test_cifake_layout_in_a_tar_gz(cli, tmp_path):
    root = tmp_path / "cifake"
    images = random_images(6, seed=3)
    names = ["0001.jpg", "0002 (2).jpg", "0003 (10).jpg"]
    for i, name in enumerate(names):
        write_image(root / "train" / "REAL" / name, images[i])
        write_image(root / "train" / "FAKE" / name, images[i + 3])
    archive = tmp_path / "cifake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    result = cli("import", archive, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    data = open_shards([tmp_path / "out"])
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    pairs = sorted(zip(data.read("origin").tolist(), data.read("labels").tolist()))
    assert pairs == [(0, 0), (0, 1), (0, 9), (1, 0), (1, 1), (1, 9)]


def cifar_batch(n=6, side=8, labels_key=b"labels"):
    rng = np.random.default_rng(0)
    return {
        b"data": rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8),
        labels_key: [i % 3 for i in range(n)],
        b"batch_label": b"test",
    }


def test_cifar_python_batches_with_meta(cli, tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batch = cifar_batch()
    (d / "data_batch_1").write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))
    result = cli("import", d, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    data = open_shards([tmp_path / "out"])
    assert data.classes == ["a", "b", "c"]
    expected = batch[b"data"].reshape(-1, 3, 8, 8).transpose(0, 2, 3, 1)
    assert np.array_equal(data.read("images"), expected)
    assert data.read("labels").tolist() == batch[b"labels"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused_and_not_run(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    result = cli("import", d, "-o", tmp_path / "out", "--classes", "a")
    assert result.exit_code == 2
    _err(result, "data_batch_1", "refusing to load")
    assert not (tmp_path / "pwned").exists()


def test_dedup_drops_exact_duplicates(cli, tmp_path):
    img = random_images(2, seed=5)
    for i in range(3):
        write_image(tmp_path / "src" / "cat" / f"{i}.png", img[0])
    write_image(tmp_path / "src" / "dog" / "x.png", img[1])
    result = cli("import", tmp_path / "src", "-o", tmp_path / "out", "--dedup")
    assert result.exit_code == 0
    assert len(open_shards([tmp_path / "out"])) == 2
    assert "dropped 2 exact duplicates" in result.stderr


def test_corrupt_images_are_skipped_and_named_or_fatal_with_strict(cli, image_folder, tmp_path):
    (image_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = image_folder / "dog" / "0001.png"
    (image_folder / "dog" / "truncated.png").write_bytes(good.read_bytes()[:40])
    (image_folder / "frog" / "empty.png").write_bytes(b"")
    result = cli("import", image_folder, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert len(open_shards([tmp_path / "out"])) == 12
    assert "skipped 3 image(s)" in result.stderr
    for name in ("broken.jpg", "truncated.png", "empty.png"):
        assert name in result.stderr
    strict = cli("import", image_folder, "-o", tmp_path / "strict", "--strict")
    assert strict.exit_code == 2
    _err(strict, "broken.jpg")
    assert not list((tmp_path / "strict").glob("*.h5*"))


def test_size_mismatch_is_refused_or_resized_as_asked(cli, image_folder, tmp_path):
    write_image(image_folder / "cat" / "big.png", random_images(1, (16, 16))[0])
    refused = cli("import", image_folder, "-o", tmp_path / "a")
    assert refused.exit_code == 2
    _err(refused, "big.png", "16x16", "--on-mismatch resize")
    assert not list((tmp_path / "a").glob("*.h5*"))
    resized = cli("import", image_folder, "-o", tmp_path / "b", "--size", "8x8", "--on-mismatch", "resize")
    assert resized.exit_code == 0 and len(open_shards([tmp_path / "b"])) == 13
    skipped = cli("import", image_folder, "-o", tmp_path / "c", "--size", "8", "--on-mismatch", "skip")
    assert skipped.exit_code == 0 and len(open_shards([tmp_path / "c"])) == 12


def test_empty_folder_is_a_one_line_usage_error(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("import", tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 2
    _err(result, "empty: no images found")


def test_output_that_exists_is_never_clobbered(cli, image_folder, tmp_path):
    out = tmp_path / "out"
    assert cli("import", image_folder, "-o", out, "--shard-size", "5").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.h5")}
    again = cli("import", image_folder, "-o", out)
    assert again.exit_code == 2
    _err(again, str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.glob("*.h5")} == before
    replaced = cli("import", image_folder, "-o", out, "--overwrite")  # one shard now: stale ones removed
    assert replaced.exit_code == 0
    assert sorted(p.name for p in out.glob("*.h5")) == ["shard-00000.h5"]


def test_unwritable_output_is_a_one_line_error(cli, image_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("import", image_folder, "-o", blocker / "out")
    assert result.exit_code == 2
    _err(result, str(blocker / "out"))
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory(cli, image_folder, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    result = cli("import", image_folder, "-o", ro)
    assert result.exit_code == 2
    _err(result, "not writable")


def test_sources_from_stdin_and_json_summary(cli, image_folder, tmp_path):
    result = cli("import", "-o", tmp_path / "out", "--json", stdin=f"{image_folder}\n")
    assert result.exit_code == 0
    (summary,) = result.json_lines()
    assert summary["images"] == 12 and summary["per_class"] == {"cat": 4, "dog": 4, "frog": 4}


def test_classes_option_fixes_order_and_refuses_unknown_folders(cli, image_folder, tmp_path):
    ok = cli("import", image_folder, "-o", tmp_path / "a", "--classes", "frog,dog,cat,bird")
    assert ok.exit_code == 0 and open_shards([tmp_path / "a"]).classes == ["frog", "dog", "cat", "bird"]
    bad = cli("import", image_folder, "-o", tmp_path / "b", "--classes", "dog,cat")
    assert bad.exit_code == 2
    _err(bad, "frog", "--classes")


def test_image_modes_and_exif_are_normalized(tmp_path):
    from PIL import Image

    from fakecifar.images import decode_image

    def encode(img, fmt="PNG", **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white
    assert decode_image(encode(rgba))[0, 0].tolist() == [255, 255, 255]
    gray16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_image(encode(gray16))[0, 0].tolist() == [255, 255, 255]
    wide = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 6x2 image is shown 2x6
    assert decode_image(encode(wide, "JPEG", exif=exif)).shape == (6, 2, 3)
    palette = Image.new("P", (3, 3), 0)
    assert decode_image(encode(palette)).shape == (3, 3, 3)


def test_decompression_bomb_is_refused_by_the_pixel_limit():
    from PIL import Image

    from fakecifar.errors import BadImageError
    from fakecifar.images import decode_image

    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    with pytest.raises(BadImageError, match="pixel limit"):
        decode_image(buf.getvalue(), "bomb.png")
