"""`fakecifar detect`: every kind of input, every bad input, the light (torch-free) path."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakecifar.detect import DEFAULT_MODEL

from helpers import cli_in_fresh_process, random_images, write_image


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """An untrained real/fake LeNet as .onnx and .pt, and a 3-class model detect must refuse."""
    import torch

    from fakecifar.checkpoint import export_onnx, save_checkpoint
    from fakecifar.models import build_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    meta: dict[str, Any] = {
        "arch": "lenet5",
        "arch_kwargs": {},
        "classes": ["real", "fake"],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "input_size": [32, 32],
    }
    model = build_model("lenet5", 2).eval()
    export_onnx(model, meta, root / "det.onnx")
    save_checkpoint(root / "det.pt", model, **meta)
    export_onnx(build_model("lenet5", 3).eval(), {**meta, "classes": ["a", "b", "c"]}, root / "abc.onnx")
    return root


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    arrays = random_images(3, (32, 32), seed=5)
    return [write_image(tmp_path / f"img{i}.png", a) for i, a in enumerate(arrays)]


def parse(result):
    return [line.split("\t") for line in result.lines]


def test_files_get_one_line_each_in_order(cli, tiny_models, images):
    result = cli("detect", "--model", tiny_models / "det.onnx", *images)
    assert result.exit_code == 0, result.stderr
    rows = parse(result)
    assert [r[0] for r in rows] == [str(p) for p in images]
    for _, label, p in rows:
        assert label == ("fake" if float(p) >= 0.5 else "real") and len(p.split(".")[1]) == 3


def test_onnx_and_torch_checkpoints_agree(cli, tiny_models, images):
    onnx = parse(cli("detect", "-m", tiny_models / "det.onnx", *images))
    pt = parse(cli("detect", "-m", tiny_models / "det.pt", *images))
    assert [abs(float(a[2]) - float(b[2])) < 2e-3 for a, b in zip(onnx, pt)] == [True] * 3


def test_threshold_and_json(cli, tiny_models, images):
    all_fake = cli("detect", "-m", tiny_models / "det.onnx", "--threshold", "0", "--json", *images)
    records = all_fake.json_lines()
    assert [r["label"] for r in records] == ["fake"] * 3
    assert set(records[0]) == {"path", "label", "p_fake", "model"}
    bad = cli("detect", "-m", tiny_models / "det.onnx", "--threshold", "1.5", *images)
    assert bad.exit_code == 2 and "--threshold" in bad.stderr


def test_folder_shard_and_stdin_inputs(cli, tiny_models, images, tmp_path, make_shard):
    (tmp_path / "notes.txt").write_text("not an image")
    folder = cli("detect", "-m", tiny_models / "det.onnx", tmp_path)
    assert folder.exit_code == 0
    assert len(folder.lines) == 3 and "notes.txt: skipped (not an image file name)" in folder.stderr
    shard = make_shard("s.h5", n=5, size=(32, 32), directory=tmp_path / "shards")
    from_shard = cli("detect", "-m", tiny_models / "det.onnx", shard)
    assert [r[0] for r in parse(from_shard)] == [f"{shard}:{i}" for i in range(5)]
    from_dir = cli("detect", "-m", tiny_models / "det.onnx", tmp_path / "shards")  # a folder of shards
    assert [r[0] for r in parse(from_dir)] == [f"{shard}:{i}" for i in range(5)]
    raw = cli("detect", "-m", tiny_models / "det.onnx", "-", stdin=images[0].read_bytes())
    assert parse(raw)[0][0] == "-"
    paths = cli("detect", "-m", tiny_models / "det.onnx", stdin="\n".join(map(str, images)) + "\n")
    assert [r[0] for r in parse(paths)] == [str(p) for p in images]


def test_bad_items_get_one_line_each_and_the_rest_are_answered(cli, tiny_models, images, tmp_path):
    good = images[0]
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(random_images(1, (32, 32))[0]).save(jpeg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:200])
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")
    (tmp_path / "bomb.png").write_bytes(bomb.getvalue())
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    bad = ["text.jpg", "empty.png", "cut.jpg", "bomb.png", "dangling.png"]
    result = cli("detect", "-m", tiny_models / "det.onnx", good, *[tmp_path / b for b in bad])
    assert result.exit_code == 1
    assert [r[0] for r in parse(result)] == [str(good)]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad)
    for name, line in zip(bad, warnings):
        assert name in line, line
    assert "pixel limit" in warnings[3]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(cli, tiny_models, images):
    images[1].chmod(0)
    result = cli("detect", "-m", tiny_models / "det.onnx", *images)
    assert result.exit_code == 1 and len(result.lines) == 2 and "cannot read" in result.stderr


def test_odd_modes_animated_gif_and_cautions(cli, tiny_models, tmp_path):
    frames = [Image.fromarray(a) for a in random_images(3, (32, 32))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGBA", (32, 32), (10, 200, 30, 128)).save(tmp_path / "alpha.png")
    Image.new("I;16", (32, 32), 40000).save(tmp_path / "deep.png")
    write_image(tmp_path / "wide.png", random_images(1, (32, 96))[0])
    write_image(tmp_path / "huge.png", random_images(1, (400, 400))[0])
    result = cli("detect", "-m", tiny_models / "det.onnx", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert len(result.lines) == 5
    assert "wide.png: 32x96 (HxW) is not square; the model was trained on 32x32 images" in result.stderr
    assert "huge.png: 400x400 is much larger" in result.stderr


def test_model_without_a_fake_class_is_refused(cli, tiny_models, images):
    result = cli("detect", "-m", tiny_models / "abc.onnx", images[0])
    assert result.exit_code == 2 and "no real/fake split" in result.stderr


def test_onnx_path_never_imports_torch(tiny_models, images):
    run = cli_in_fresh_process("detect", "-m", tiny_models / "det.onnx", images[0])
    assert run.exit_code == 0 and "torch" not in run.imported, run.stderr


def test_builtin_model_ships_and_answers(cli, images):
    """The embedded default model: small, real/fake, works with no --model."""
    from fakecifar.checkpoint import OnnxClassifier

    assert DEFAULT_MODEL.stat().st_size <= 2_000_000  # the limit: 2 MB
    assert OnnxClassifier(DEFAULT_MODEL).classes == ["real", "fake"]
    result = cli("detect", "--json", images[0])
    assert result.exit_code == 0
    (record,) = result.json_lines()
    assert record["model"] == "builtin:detector.onnx" and 0.0 <= record["p_fake"] <= 1.0


def test_files_are_prepared_exactly_as_import_and_resize_prepare_training_data(cli, tiny_models, tmp_path):
    """A 96x96 RGBA or palette file scores the same as the same file imported, then resized to 32."""
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    a, b = random_images(2, (96, 96), seed=11)
    Image.fromarray(a).convert("RGBA").save(src / "a.png")
    Image.fromarray(b).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "b.png")
    assert cli("import", tmp_path / "src", "-o", tmp_path / "raw").exit_code == 0
    assert cli("resize", tmp_path / "raw", "--size", "32", "-o", tmp_path / "small").exit_code == 0
    model = ["-m", tiny_models / "det.onnx", "--json"]
    direct = [r["p_fake"] for r in cli("detect", *model, src / "a.png", src / "b.png").json_lines()]
    via_shards = [r["p_fake"] for r in cli("detect", *model, tmp_path / "small").json_lines()]
    assert direct == via_shards
    # The comparison can tell preparations apart: a non-antialiased resize scores differently.
    Image.open(src / "a.png").convert("RGB").resize((32, 32), Image.Resampling.NEAREST).save(tmp_path / "nn.png")
    (nearest,) = [r["p_fake"] for r in cli("detect", *model, tmp_path / "nn.png").json_lines()]
    assert nearest != direct[0]


def test_tta_averages_the_image_and_its_mirror(cli, tiny_models, tmp_path):
    (array,) = random_images(1, (32, 32), seed=3)
    plain, mirror = write_image(tmp_path / "a.png", array), write_image(tmp_path / "b.png", array[:, ::-1])
    model = ["-m", tiny_models / "det.onnx", "--json", plain, mirror]
    p, p_mirror = [r["p_fake"] for r in cli("detect", *model).json_lines()]
    assert p != p_mirror  # the model is not mirror-symmetric, so the test can tell
    tta = [r["p_fake"] for r in cli("detect", "--tta", *model).json_lines()]
    assert tta[0] == tta[1] and abs(tta[0] - (p + p_mirror) / 2) < 2e-6


def test_a_dataset_folder_is_read_without_warnings_about_its_bookkeeping(tmp_path):
    """manifest.json, the output lock and partial files are not inputs: no 'skipped' lines."""
    from fakecifar.cli.app import main

    out = tmp_path / "raw"
    with pytest.raises(SystemExit):
        main(["-q", "import", "--sample", "--shard-size", "400", "-o", str(out)])
    (out / "shard-00001.h5.partial").write_bytes(b"half")
    run = cli_in_fresh_process("detect", out)
    assert run.exit_code == 0 and "skipped" not in run.stderr, run.stderr
    assert len(run.stdout.splitlines()) == 400 and "torch" not in run.imported
