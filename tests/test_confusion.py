"""`fakecifar confusion`: tables, CSV, JSON and the PNG heatmap."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from helpers import CLASSES3

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from fakecifar.shards import ShardWriter, open_shards
    from fakecifar.train import make_config, train

    from helpers import random_images

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("confusion")
    images = random_images(24, (8, 8), 3)
    labels = np.arange(24) % 3
    with ShardWriter(root / "d.h5", classes=CLASSES3, image_size=(8, 8), producer="test") as w:
        w.add_batch(images, labels)
    pt = root / "m.pt"
    train(
        open_shards([root / "d.h5"]),
        pt,
        make_config(model="resnet20", epochs=1, batch_size=12, precision="fp32"),
        onnx=True,
    )
    return pt, root / "d.h5"


def test_tables_csv_json_agree(cli, model_and_data):
    pt, data = model_and_data
    table = cli("confusion", pt, "--on", data)
    assert table.exit_code == 0, table.stderr
    assert "counts (rows: true class, columns: predicted)" in table.stdout and "row-normalized %" in table.stdout
    js = cli("confusion", pt, "--on", data, "--json").json_lines()[0]
    counts = np.array(js["counts"])
    assert js["classes"] == CLASSES3 and counts.shape == (3, 3) and counts.sum() == 24
    assert counts.sum(axis=1).tolist() == [8, 8, 8]
    assert np.allclose(np.array(js["normalized"]).sum(axis=1), 1.0)
    rows = list(csv.reader(io.StringIO(cli("confusion", pt, "--on", data, "--csv").stdout)))
    assert rows[0] == ["true\\predicted", *CLASSES3]
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == counts.tolist()
    for i, name in enumerate(CLASSES3):  # every count appears in the table
        line = next(row for row in table.lines if row.startswith(name))
        assert line.split()[1:] == [str(v) for v in counts[i]]
    onnx = cli("confusion", pt.with_suffix(".onnx"), "--on", data, "--json").json_lines()[0]
    assert onnx["counts"] == js["counts"]


def test_png_heatmap(cli, model_and_data, tmp_path):
    from PIL import Image

    pt, data = model_and_data
    png = tmp_path / "cm.png"
    r = cli("confusion", pt, "--on", data, "--png", png)
    assert r.exit_code == 0, r.stderr
    img = Image.open(png)
    assert img.format == "PNG" and img.width > 200 and img.height > 200
    pixels = np.asarray(img.convert("RGB"))
    assert (pixels < 100).all(axis=2).sum() > 500  # text and dark cells were drawn
    before = png.read_bytes()
    again = cli("confusion", pt, "--on", data, "--png", png)
    assert again.exit_code == 2 and "cm.png" in again.stderr and "--overwrite" in again.stderr
    assert png.read_bytes() == before
    assert cli("confusion", pt, "--on", data, "--png", png, "--overwrite").exit_code == 0


def test_heatmap_of_twenty_classes(tmp_path):
    from PIL import Image

    from fakecifar.metrics import confusion_heatmap

    classes = [
        f"{o}/{c}"
        for o in ("real", "fake")
        for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    cm = np.random.default_rng(0).integers(0, 50, (20, 20)) + np.eye(20, dtype=int) * 400
    path = confusion_heatmap(cm, classes, tmp_path / "big.png", title="twenty")
    img = Image.open(path)
    assert img.width >= 20 * 40 and img.height >= 20 * 40


def test_usage_errors(cli, model_and_data, tmp_path):
    pt, data = model_and_data
    assert cli("confusion", pt).exit_code == 2
    r = cli("confusion", pt, pt.with_suffix(".onnx"), "--on", data)
    assert r.exit_code == 2 and "one model" in r.stderr
    assert cli("confusion", pt, "--on", data, "--csv", "--json").exit_code == 2
    r = cli("confusion", pt, "--on", data, "--png", tmp_path / "no" / "dir" / "x.png")
    assert r.exit_code == 2 and "x.png" in r.stderr
