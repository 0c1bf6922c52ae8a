"""Ensembling ONNX detectors (`fakecifar.ensemble`, scripts/ensemble_onnx.py): the merged
graph answers what its members answer together, `detect` reads it on onnxruntime alone, and
bad members are refused with one line while an existing output survives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakecifar.checkpoint import OnnxClassifier
from fakecifar.detect import fake_columns
from fakecifar.ensemble import ensemble_onnx
from fakecifar.errors import BadCheckpointError, UsageError

from helpers import REPO, cli_in_fresh_process, random_images, write_image

ORIGIN_CLASS = [f"{o}/{c}" for o in ("real", "fake") for c in ("cat", "dog", "ship")]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Untrained LeNets of different seeds: 2-class (fake first, unlike the ensemble's order),
    6-class origin x class, one without a real/fake split, and one at another input size."""
    import torch

    from fakecifar.checkpoint import export_onnx
    from fakecifar.models import build_model

    root = tmp_path_factory.mktemp("members")

    def member(name: str, classes: list[str], seed: int, size: int = 32) -> Path:
        torch.manual_seed(seed)
        meta: dict[str, Any] = {
            "arch": "lenet5",
            "arch_kwargs": {},
            "classes": classes,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "input_size": [size, size],
        }
        return export_onnx(build_model("lenet5", len(classes)).eval(), meta, root / name)

    return {
        "two": member("two.onnx", ["fake", "real"], 0),
        "twenty": member("origin-class.onnx", ORIGIN_CLASS, 1),
        "abc": member("abc.onnx", ["a", "b", "c"], 2),
        "small": member("small.onnx", ["real", "fake"], 3, size=52),
    }


def p_fake(path: Path, x: np.ndarray) -> np.ndarray:
    clf = OnnxClassifier(path)
    return clf.predict_proba(x)[:, fake_columns(clf.classes)].sum(axis=1)


def test_the_ensemble_answers_the_mean_of_its_members(members, tmp_path):
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    expected = (p_fake(members["two"], x) + p_fake(members["twenty"], x)) / 2
    assert np.abs(p_fake(members["two"], x) - p_fake(members["twenty"], x)).max() > 1e-3  # they differ
    exact = ensemble_onnx([members["two"], members["twenty"]], tmp_path / "fp32.onnx", fp16=False)
    half = ensemble_onnx([members["two"], members["twenty"]], tmp_path / "fp16.onnx")
    merged = OnnxClassifier(exact)
    assert merged.classes == ["real", "fake"] and merged.arch == "ensemble"
    assert [m["file"] for m in merged.meta["arch_kwargs"]["members"]] == ["two.onnx", "origin-class.onnx"]
    np.testing.assert_allclose(merged.predict_proba(x)[:, 1], expected, atol=1e-6)
    np.testing.assert_allclose(p_fake(half, x), expected, atol=2e-3)  # weights rounded to float16
    assert half.stat().st_size < 0.6 * exact.stat().st_size
    again = ensemble_onnx([members["two"], members["twenty"]], tmp_path / "again.onnx")
    assert again.read_bytes() == half.read_bytes()  # same members, same bytes


def test_detect_reads_an_ensemble_without_torch(members, tmp_path):
    model = ensemble_onnx([members["two"], members["twenty"]], tmp_path / "ens.onnx")
    image = write_image(tmp_path / "one.png", random_images(1, (32, 32), seed=3)[0])
    run = cli_in_fresh_process("detect", "--json", "-m", model, image)
    assert run.exit_code == 0 and "torch" not in run.imported, run.stderr
    expected = (p_fake(members["two"], _pixels(image)) + p_fake(members["twenty"], _pixels(image))) / 2
    (record,) = run.json_lines()
    assert abs(record["p_fake"] - expected[0]) < 2e-3


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return (np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).transpose(2, 0, 1)[None].copy()


@pytest.mark.parametrize(
    ("names", "error", "needle"),
    [
        (["two"], UsageError, "at least two member models"),
        (["two", "abc"], BadCheckpointError, "no real/fake split"),
        (["two", "small"], UsageError, "different input sizes"),
    ],
)
def test_bad_members_are_refused_and_the_output_is_kept(members, tmp_path, names, error, needle):
    out = tmp_path / "ens.onnx"
    out.write_bytes(b"an earlier ensemble")
    with pytest.raises(error, match=needle):
        ensemble_onnx([members[n] for n in names], out)
    assert out.read_bytes() == b"an earlier ensemble" and list(tmp_path.iterdir()) == [out]


def test_the_script_gives_one_line_and_the_cli_exit_codes(members, tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "ensemble_onnx.py")]
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    out = tmp_path / "ens.onnx"
    bad = subprocess.run([*script, str(members["two"]), str(text), "-o", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and not out.exists()
    assert bad.stderr.count("\n") == 1 and f"{text}: not a model file" in bad.stderr
    good = subprocess.run([*script, str(members["two"]), str(members["twenty"]), "-o", str(out)], capture_output=True)
    assert good.returncode == 0 and good.stdout.decode().strip() == str(out)
    assert OnnxClassifier(out).classes == ["real", "fake"]
