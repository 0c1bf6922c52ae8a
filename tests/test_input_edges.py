"""Small input edges: binary stdin, unprintable file names, float TIFFs holding NaN, empty
inputs, class lists and sizes in messages, one pixel limit, files that are not models given as
models, and help that fits 80 columns. Each bad input gets one error line and exit 2, and
nothing already there is lost."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakecifar.cli.app import COMMANDS

from helpers import CLASSES3, REPO, cli_in_fresh_process, one_error_line, random_images, write_image

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# 100 bytes of "random" data that hold a NUL and invalid UTF-8, as `head -c 100 /dev/urandom` does.
JUNK = bytes(np.random.default_rng(7).integers(0, 256, 100, dtype=np.uint8)) + b"\x00\xff\xfe"


@pytest.fixture
def image(tmp_path) -> Path:
    return write_image(tmp_path / "good.png", random_images(1, (32, 32), seed=2)[0])


def float_tiff(path: Path, bad: float) -> Path:
    """A real 32-bit float TIFF (Pillow mode 'F') with one NaN or infinite pixel."""
    pixels = np.full((8, 8), 0.5, np.float32)
    pixels[3, 4] = bad
    Image.fromarray(pixels).save(path, format="TIFF")
    assert Image.open(path).mode == "F"
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (1-bit gray) in its header: all a bomb needs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- stdin


def test_binary_stdin_is_neither_an_image_nor_a_list_of_paths(cli, image):
    before = image.read_bytes()
    for stdin in (JUNK, b"a.png\x00b.png\n", b"\xff\xfe not utf-8\n"):
        for args in (["detect", "-"], ["detect"], ["detect", image, "-"]):
            r = cli(*args, stdin=stdin)
            assert r.exit_code == 2 and r.stdout == "", (args, r.stderr)
            one_error_line(r, "stdin is neither an image nor a list of paths", command="detect")
        r = cli("stats", stdin=stdin)  # any command that reads paths from stdin
        assert r.exit_code == 2 and r.stdout == ""
        one_error_line(r, "stdin is not a list of paths", command="stats")
    assert image.read_bytes() == before


def test_binary_stdin_through_a_real_pipe():
    """`head -c 100 /dev/urandom | fakecifar detect -`, with the process's own stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "fakecifar", "detect", "-"], input=JUNK, capture_output=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "fakecifar detect: error: stdin is neither an image nor a list of paths "
        "(pipe an image or UTF-8 text, one path a line, or give the inputs as "
        "arguments)\n"
    )


def test_empty_folder_or_stdin_says_no_image_was_given(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("detect", empty)
    assert r.exit_code == 2 and r.stdout == ""
    one_error_line(r, f"no image given: {empty} held no images", command="detect")
    (empty / "notes.txt").write_text("not an image")  # skipped with a note, still no image
    r = cli("detect", empty)
    assert r.exit_code == 2
    one_error_line(r, "no image given", command="detect", last=True)
    for stdin in ("", "\n\n"):
        for args in (["detect"], ["detect", "-"]):
            r = cli(*args, stdin=stdin)
            assert r.exit_code == 2 and r.stdout == ""
            one_error_line(r, "no image given: stdin held no images", command="detect")
    assert (empty / "notes.txt").read_text() == "not an image"


# ----------------------------------------------------------------------------- unprintable names


def test_unprintable_characters_in_paths_are_escaped_everywhere(cli, tmp_path, image):
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / "clear\x1b[2J.png").write_text("not an image")  # a warning quotes it
    shutil.copy(image, folder / "tab\there.png")  # an answer quotes it
    undecodable = os.fsencode(folder) + b"/bad\xff.png"  # a name that is not UTF-8
    with open(undecodable, "wb") as fh:
        fh.write(b"not an image either")
    r = cli("detect", folder)
    assert r.exit_code == 1  # two inputs could not be read; the third is answered
    assert "\x1b" not in r.stderr and "\x1b" not in r.stdout
    assert "clear\\x1b[2J.png: not an image" in r.stderr
    assert "bad\\udcff.png: not an image" in r.stderr
    (line,) = r.lines
    path, label, p_fake = line.split("\t")
    assert path == f"{folder}/tab\\there.png" and label in ("real", "fake") and 0 <= float(p_fake) <= 1
    assert r.stdout.encode() and r.stderr.encode()  # printable: nothing that cannot be written
    # The one error line of any command, and paths read from stdin.
    r = cli("stats", tmp_path / "no\x07such\nfile.h5")
    assert r.exit_code == 2 and "\x07" not in r.stderr
    one_error_line(r, "no\\x07such\\nfile.h5", command="stats")
    r = cli("detect", stdin=f"{tmp_path}/gone\x1b]0;owned\x07.png\n")
    assert "\x1b" not in r.stderr and "gone\\x1b]0;owned\\x07.png" in r.stderr


def test_printable_keeps_unicode_and_escapes_the_rest():
    from fakecifar.text import printable

    assert printable("Grüße/猫 ok.png") == "Grüße/猫 ok.png"
    assert printable("a\x1b[31mb\tc\nd\x7f\u200be\udcff") == "a\\x1b[31mb\\tc\\nd\\x7f\\u200be\\udcff"


# ----------------------------------------------------------------------------- NaN float TIFF


def test_float_tiff_holding_nan_or_infinity_is_undecodable(cli, tmp_path, image):
    from fakecifar.errors import BadImageError
    from fakecifar.images import decode_image

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    nan = float_tiff(src / "nan.tif", np.nan)
    inf = float_tiff(src / "inf.tif", np.inf)
    for path in (nan, inf):
        with pytest.raises(BadImageError, match="cannot decode .pixel values are NaN or infinite"):
            decode_image(path.read_bytes(), path.name)
    ok = Image.fromarray(np.full((8, 8), 0.25, np.float32))  # a finite float TIFF still decodes
    ok.save(src / "fine.tif", format="TIFF")

    r = cli("import", tmp_path / "src", "-o", tmp_path / "out")  # skipped and listed
    assert r.exit_code == 0 and r.lines == [str(tmp_path / "out" / "shard-00000.h5")]
    assert "skipped 2 image(s)" in r.stderr and "nan.tif: cannot decode" in r.stderr
    assert "inf.tif: cannot decode" in r.stderr
    from fakecifar.shards import Shard

    assert len(Shard(tmp_path / "out" / "shard-00000.h5")) == 1

    r = cli("import", tmp_path / "src", "-o", tmp_path / "strict", "--strict")  # fatal, nothing written
    assert r.exit_code == 2 and r.stdout == ""
    one_error_line(r, "inf.tif: cannot decode (pixel values are NaN or infinite)", command="import")
    assert not list(tmp_path.glob("strict/*.h5"))
    assert len(Shard(tmp_path / "out" / "shard-00000.h5")) == 1  # the earlier import is intact

    r = cli("detect", nan, image)  # refused like any undecodable image; the rest is answered
    assert r.exit_code == 1 and [line.split("\t")[0] for line in r.lines] == [str(image)]
    assert f"warning: {nan}: cannot decode (pixel values are NaN or infinite)" in r.stderr


# ----------------------------------------------------------------------------- classes and sizes


def test_class_lists_say_how_many_and_mark_elisions():
    from fakecifar.text import format_classes

    assert format_classes(CIFAR10) == "['airplane', 'automobile', 'bird', 'cat', ..., 'truck'] (10 classes)"
    assert format_classes(CLASSES3) == "['cat', 'dog', 'frog'] (3 classes)"
    assert format_classes(["x"]) == "['x'] (1 class)"
    assert format_classes(CIFAR10[:6]) == str(CIFAR10[:6]) + " (6 classes)"  # short lists in full
    assert format_classes(["a\x1bb"]) == "['a\\x1bb'] (1 class)"


def test_a_class_mismatch_lists_both_class_lists(cli, make_shard, tmp_path):
    a = make_shard("a.h5", classes=CIFAR10, n=10)
    b = make_shard("b.h5", classes=CLASSES3)
    r = cli("split", a, b, "-o", tmp_path / "out")
    assert r.exit_code == 2 and r.stdout == ""
    one_error_line(
        r,
        "b.h5: classes ['cat', 'dog', 'frog'] (3 classes) differ from",
        "['airplane', 'automobile', 'bird', 'cat', ..., 'truck'] (10 classes)",
        command="split",
    )
    assert not (tmp_path / "out").exists()


def test_one_pixel_limit_quoted_one_way(tmp_path):
    """Over our limit, over Pillow's warning limit and over its hard limit: the same words,
    sizes HxW, and never Pillow's own figures."""
    from fakecifar.errors import BadImageError
    from fakecifar.images import MAX_PIXELS, decode_image

    assert MAX_PIXELS == 24_000_000
    cases = {
        (6000, 4500): "4500x6000 = 27,000,000 pixels",
        (10000, 10000): "10000x10000 = 100,000,000 pixels",
        (20000, 10000): "200,000,000 pixels",
    }
    for (width, height), what in cases.items():
        with pytest.raises(BadImageError) as info:
            decode_image(png_header(width, height), "big.png")
        assert str(info.value) == (
            f"big.png: {what}, over the 24,000,000-pixel limit (refusing a possible decompression bomb)"
        )


# ----------------------------------------------------------------------------- not a model file


@pytest.fixture
def non_models(tmp_path, make_shard, image) -> dict[str, Path]:
    """Files that are not models, each with a model's name, and what they are."""
    root = tmp_path / "models"
    root.mkdir()
    files = {
        "text": root / "notes.pt",
        "random": root / "random.pt",
        "shard": root / "shard.pt",
        "image": root / "picture.th",
        "empty": root / "empty.pt",
    }
    files["text"].write_text("epoch 3: loss 0.41\n")
    files["random"].write_bytes(JUNK * 20)
    shutil.copy(make_shard("s.h5", directory=tmp_path), files["shard"])
    shutil.copy(image, files["image"])
    files["empty"].write_bytes(b"")
    return files


KINDS = {
    "text": "it is text",
    "random": "neither the zip nor the pickle stream",
    "shard": "an HDF5 file",
    "image": "it is an image",
    "empty": "an empty file",
}


def test_a_file_that_is_not_a_model_says_so(cli, non_models, make_shard, image, tmp_path):
    data = make_shard("data.h5", directory=tmp_path / "data", size=(32, 32))
    for kind, path in non_models.items():
        before = path.read_bytes()
        runs = {
            "detect": cli("detect", "--model", path, image),
            "eval": cli("eval", path, "--on", data),
            "train": cli("train", data, "--resume", path, "-o", tmp_path / "out.pt", "--epochs", "1"),
        }
        for command, r in runs.items():
            assert r.exit_code == 2 and r.stdout == "", (kind, command, r.stderr)
            one_error_line(r, f"{path}: not a model file", KINDS[kind], command=command, last=command == "train")
            assert "Python objects" not in r.stderr and "internal error" not in r.stderr
        assert path.read_bytes() == before
    assert not (tmp_path / "out.pt").exists()


def test_a_non_model_named_onnx_is_refused_without_torch(cli, tmp_path, image):
    notes, junk = tmp_path / "notes.onnx", tmp_path / "junk.onnx"
    notes.write_text("not a model\n")
    junk.write_bytes(JUNK * 20)
    run = cli_in_fresh_process("detect", "--model", notes, image)
    assert run.exit_code == 2 and run.stdout == "" and "torch" not in run.imported
    assert run.stderr.strip().startswith(f"fakecifar detect: error: {notes}: not a model file (it is text;")
    r = cli("detect", "--model", junk, image)
    assert r.exit_code == 2 and r.stdout == ""
    one_error_line(r, f"{junk}: not a model file (it does not start as an ONNX model does", command="detect")


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_fits_80_columns_with_flags_as_flags_and_names_whole(cli, monkeypatch, command):
    import typer
    from typer.core import TyperGroup

    from fakecifar.cli.app import app

    monkeypatch.setenv("COLUMNS", "80")
    r = cli(command, "--help")
    assert r.exit_code == 0 and r.stdout.startswith(f"Usage: fakecifar {command} ")
    assert "<bool>" not in r.stdout and "…" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    click_command = group.commands[command]
    for param in click_command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                assert name in r.stdout, name
        if getattr(param, "is_flag", False):  # a flag takes no value: no metavar after it
            assert f"{param.opts[-1]} <" not in r.stdout


def test_train_help_shows_the_options_named_in_the_issue(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = cli("train", "--help").stdout
    assert "--wd, --weight-decay <float>" in out and "--nesterov / --no-nesterov" in out
    assert "\n  --list-models " in out
    assert "--size" in cli("import", "--help").stdout and "HxW (height x width)" in cli("import", "--help").stdout


def test_generated_docs_keep_verbatim_blocks():
    text = (REPO / "man" / "fakecifar-mine.1").read_text()
    assert ".nf\n  fakecifar mine --api craiyon" in text and "\b" not in text
