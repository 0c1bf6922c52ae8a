"""`fakecifar extract`: a model turned back into a dataset, end to end through the real CLI at toy
scale -- a real tiny teacher (resnet20 on 16x16, 4 classes; a lenet5 without BatchNorm), every
method, the shards' columns and provenance, the ledger counting every pass, `train --soft l2`
and `stats` on the output, exact resume after SIGTERM and kill -9, and every bad input of the
issue with nothing already written lost."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from teacher_server import CLASSES, MEAN, SIZE, STD

from fakecifar.manifest import describe_directory
from fakecifar.shards import ShardWriter, open_shards

from helpers import one_error_line, random_images, run_blocked

K = len(CLASSES)
STEPS = 3
# 10 images in shards of 6 (two shards) and batches of 4: the last batch of each shard is short.
TINY = ["-n", "10", "--shard-size", "6", "--batch-size", "4", "--steps", str(STEPS), "--device", "cpu"]
METHODS = ["dfm", "deepinversion", "data-impressions", "class-impressions"]


def columns(directory: Path) -> dict[str, np.ndarray]:
    data = open_shards([directory])
    return {name: data.read(name) for name in data.columns}


def ledger_of(directory: Path) -> dict:
    from fakecifar.ledger import QueryLedger

    with QueryLedger(directory / "ledger.sqlite") as ledger:
        return ledger.summary()


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Substitute images for dfm: two shards of 16x16 images of other classes (a dataset)."""
    directory = tmp_path_factory.mktemp("background")
    for i in range(2):
        with ShardWriter(directory / f"b{i}.h5", classes=["x", "y"], image_size=(SIZE, SIZE), producer="test") as w:
            w.add_batch(random_images(7, (SIZE, SIZE), 10 + i), np.arange(7) % 2)
    describe_directory(directory)
    return directory


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher without BatchNorm layers."""
    import torch

    from fakecifar.checkpoint import save_checkpoint
    from fakecifar.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "lenet.pt"
    return save_checkpoint(
        path, build_model("lenet5", K), arch="lenet5", classes=CLASSES, mean=MEAN, std=STD, input_size=SIZE
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_shards_with_the_teachers_logits_and_the_ledger_counts_every_pass(
    cli, models, background, tmp_path, method
):
    from fakecifar.teachers import open_teacher

    out = tmp_path / method
    extra = ["--background", background] if method == "dfm" else []
    result = cli("extract", "--teacher", models.pt, "--method", method, *TINY, *extra, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out / "shard-00000.h5"), str(out / "shard-00001.h5")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 10 and [e["images"] for e in manifest["shards"]] == [6, 4]
    data = columns(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (10, SIZE, SIZE, 3)
    assert data["labels"].dtype == np.int16 and data["labels"].tolist() == [i % K for i in range(10)]  # balanced
    assert data["logits"].dtype == np.float32 and data["logits"].shape == (10, K)
    assert data["origin"].tolist() == [1] * 10 and data["teacher_labels"].tolist() == data["logits"].argmax(1).tolist()
    # The logits are the teacher's answers on the stored (quantised) pixels.
    with open_teacher(models.pt) as teacher:
        again = teacher.query(data["images"].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)).logits
    assert again is not None
    np.testing.assert_allclose(data["logits"], again, rtol=1e-5, atol=1e-5)
    # Provenance: the method, every parameter, the teacher's sha256.
    with h5py.File(out / "shard-00000.h5") as f:
        step = json.loads(f.attrs["provenance"])[-1]
    assert step["step"] == "extract" and step["method"] == method
    assert step["parameters"]["steps"] == STEPS and step["parameters"]["images"] == 10
    assert step["teacher"]["sha256"] == open_teacher(models.pt).describe()["sha256"]
    # Each image: STEPS forward+backward passes (charged) and one forward (asked).
    s = ledger_of(out)
    assert s["charged"] == {"white-box": 10 * STEPS} and s["by_mode"]["logits"]["queries"] == 10
    assert s["queries"] == 10 * (STEPS + 1)
    assert "10 images by " + method in result.stderr and "white-box: 30 images" in result.stderr


def test_the_output_trains_a_student_with_soft_l2_and_reads_as_a_dataset(cli, models, background, tmp_path):
    out = tmp_path / "d1"
    args = ["extract", "--teacher", models.pt, "--method", "dfm", "--background", "-", *TINY, "-o", out]
    made = cli(*args, stdin=f"{background}\n")  # the background's paths from a pipe
    assert made.exit_code == 0, made.stderr
    with h5py.File(out / "shard-00000.h5") as f:
        assert json.loads(f.attrs["provenance"])[-1]["parameters"]["background"] == [
            str(p.resolve()) for p in sorted(background.glob("*.h5"))
        ]
    trained = cli("train", out, "--soft", "l2", "--model", "lenet5", "--epochs", "1", "-o", tmp_path / "m1.pt")
    assert trained.exit_code == 0, trained.stderr
    assert trained.lines == [str(tmp_path / "m1.pt")]
    stats = cli("stats", out, "--json")
    assert stats.exit_code == 0, stats.stderr
    assert stats.json_lines()[0]["images"] == 10


def test_dfm_moves_each_background_image_by_at_most_the_steps_or_the_radius(cli, models, background, tmp_path):
    source = open_shards([background])
    bg = source.read("images").astype(np.float64) / 255
    for eps, bound in ((None, STEPS * 0.1), (0.05, 0.05)):
        out = tmp_path / f"eps-{eps}"
        more = ["--eps", str(eps)] if eps else []
        result = cli("extract", "--teacher", models.pt, "--background", background, *TINY, *more, "-o", out)
        assert result.exit_code == 0, result.stderr
        images = columns(out)["images"].astype(np.float64) / 255
        # each comes from some background image, within the bound (plus rounding to 8 bits)
        distance = np.sqrt(((images[:, None] - bg[None]) ** 2).sum(axis=(2, 3, 4))).min(axis=1)
        assert (distance <= bound + np.sqrt(3 * SIZE * SIZE) / 255 / 2 + 1e-6).all(), distance


def test_targets_teacher_takes_the_teachers_class_of_each_background_image(cli, models, background, tmp_path):
    from fakecifar.extract import BACKGROUND_SALT
    from fakecifar.teachers import open_teacher

    out = tmp_path / "t"
    args = ["extract", "--teacher", models.pt, "--background", background, "--targets", "teacher", *TINY]
    result = cli(*args, "-o", out)
    assert result.exit_code == 0, result.stderr
    data = columns(out)
    bg = open_shards([background]).read("images")
    with open_teacher(models.pt) as teacher:
        classes = teacher.query(bg.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)).labels
    rows = np.random.default_rng([BACKGROUND_SALT, 0]).permutation(len(bg))[:10]  # the backgrounds drawn
    assert data["labels"].tolist() == classes[rows].tolist()  # each image's class is its background's
    s = ledger_of(out)
    assert s["by_mode"]["logits"]["queries"] == 20 and s["charged"] == {"white-box": 10 * STEPS}  # one more forward
    for extra, needle in (([], "the background is noise"), (["--method", "class-impressions"], "it is for dfm")):
        refused = cli("extract", "--teacher", models.pt, "--targets", "teacher", *TINY, *extra, "-o", tmp_path / "r")
        assert refused.exit_code == 2
        one_error_line(refused, "--targets teacher", needle, command="extract", last=True)


def test_noise_background_and_a_foreign_th_teacher_with_arch(cli, models, tmp_path):
    out = tmp_path / "noise"
    result = cli(
        "extract", "--teacher", models.th, "--arch", "resnet20", "--background", "noise", *TINY, "-o", out, "--json"
    )
    assert result.exit_code == 0, result.stderr
    (report,) = result.json_lines()
    assert report["images"] == 10 and len(report["shards"]) == 2
    assert report["passes_per_image"] == {"forward": STEPS + 1, "backward": STEPS}
    assert report["queries"]["queries"] == 10 * (STEPS + 1)
    data = open_shards([out])
    assert len(data.classes) == 10 and data.read("labels").tolist() == list(range(10))  # the .th's 10 classes


def test_data_impressions_work_without_batchnorm_and_deepinversion_says_it_needs_it(cli, lenet, tmp_path):
    ok = cli("extract", "--teacher", lenet, "--method", "data-impressions", *TINY, "-o", tmp_path / "di")
    assert ok.exit_code == 0, ok.stderr
    refused = cli("extract", "--teacher", lenet, "--method", "deepinversion", *TINY, "-o", tmp_path / "deep")
    assert refused.exit_code == 2
    one_error_line(refused, "deepinversion needs the teacher's BatchNorm statistics", command="extract", last=True)
    assert not (tmp_path / "deep").exists()


def test_the_same_seed_gives_the_same_images_and_another_seed_others(cli, models, tmp_path):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = cli("extract", "--teacher", models.pt, "--method", "class-impressions", *TINY, "--seed", seed,
                     "-o", tmp_path / name)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        runs[name] = columns(tmp_path / name)
    assert all(np.array_equal(runs["a"][c], runs["b"][c]) for c in runs["a"])
    assert not np.array_equal(runs["a"]["images"], runs["c"]["images"])


# ----------------------------------------------------------------------------- resume

# `fakecifar ARGS` that blocks at the first batch of shard SHARD (in batch_rng, before any of its
# passes), after writing MARK on stderr, until a signal ends it.
_BLOCK_AT_SHARD = """
import sys, time
import fakecifar.extract as extract
from fakecifar.cli.app import main

real, at = extract.batch_rng, int(sys.argv[1])

def hooked(seed, shard, batch):
    if (shard, batch) == (at, 0):
        print("MARK", file=sys.stderr, flush=True)
        time.sleep(120)
    return real(seed, shard, batch)

extract.batch_rng = hooked
main(sys.argv[2:])
"""


def run_until_signalled(args: list, sig: int, shard: int = 1) -> subprocess.CompletedProcess:
    return run_blocked(_BLOCK_AT_SHARD, [shard], args, sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_interrupted_run_resumes_shard_by_shard_to_the_same_images(cli, models, background, tmp_path, sig):
    args = ["extract", "--teacher", models.pt, "--method", "dfm", "--background", background, *TINY]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli(*args, "-o", straight).exit_code == 0
    stopped = run_until_signalled([*args, "-o", cut], sig)
    assert stopped.returncode == (143 if sig == signal.SIGTERM else -9), stopped.stderr
    assert stopped.stdout.splitlines() == [str(cut / "shard-00000.h5")]  # the first shard was announced
    manifest = json.loads((cut / "manifest.json").read_text())
    assert not manifest["complete"] and [e["name"] for e in manifest["shards"]] == ["shard-00000.h5"]
    first = (cut / "shard-00000.h5").read_bytes()
    resumed = cli(*args, "-o", cut)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.lines == [str(cut / "shard-00000.h5"), str(cut / "shard-00001.h5")]
    assert "resumed: 6 images" in resumed.stderr
    assert (cut / "shard-00000.h5").read_bytes() == first  # kept, not rewritten
    a, b = columns(straight), columns(cut)
    assert a.keys() == b.keys() and all(np.array_equal(a[c], b[c]) for c in a)
    # The run was stopped before any pass of shard 1: nothing was paid twice.
    assert ledger_of(cut)["queries"] == ledger_of(straight)["queries"] == 10 * (STEPS + 1)
    assert not list(cut.glob("*.partial"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", METHODS)
def test_a_black_box_teacher_is_refused_naming_the_methods_need(cli, models, tmp_path, method):
    for teacher in (models.onnx, "http://127.0.0.1:9"):  # the URL is refused before any connection
        result = cli("extract", "--teacher", teacher, "--method", method, *TINY, "-o", tmp_path / "o")
        assert result.exit_code == 2, result.stderr
        need = "BatchNorm statistics" if method == "deepinversion" else "gradients"
        one_error_line(result, f"--method {method} needs", need, "black-box", ".pt/.th", command="extract", last=True)
    assert not (tmp_path / "o").exists()


def test_background_shards_of_another_size_are_refused_with_the_resize_hint(cli, models, make_shard, tmp_path):
    other = make_shard("big.h5", n=4, size=(12, 12))
    result = cli("extract", "--teacher", models.pt, "--background", other, *TINY, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "12x12", "takes 16x16", "fakecifar resize --size 16x16", command="extract", last=True)
    assert not (tmp_path / "o").exists()


def test_zero_images_and_options_of_another_method_are_refused(cli, models, background, tmp_path):
    for args, needle in (
        (["-n", "0"], "-n must be at least 1, got 0"),
        (["-n", "4", "--method", "deepinversion", "--background", background], "--background is for dfm"),
        (["-n", "4", "--method", "deepinversion", "--step-size", "0.5"], "--step-size is an option of dfm"),
        (["-n", "4", "--betas", "1,0.1"], "--betas is an option of data-impressions"),
        (["--method", "dfm"], "Missing option '-n'"),
    ):
        result = cli("extract", "--teacher", models.pt, *args, "-o", tmp_path / "o")
        assert result.exit_code == 2, (args, result.stderr)
        one_error_line(result, needle, command="extract", last=True)
    assert not (tmp_path / "o").exists()


def test_non_finite_values_stop_the_run_and_keep_the_finished_shards(cli, models, tmp_path, monkeypatch):
    import fakecifar.extract

    real, calls = fakecifar.extract.virtual_logits, []

    def poisoned(targets, *args, **kwargs):  # the second batch (shard 1) aims at infinite logits
        calls.append(1)
        v = real(targets, *args, **kwargs)
        return v * np.float32("inf") if len(calls) == 2 else v

    monkeypatch.setattr(fakecifar.extract, "virtual_logits", poisoned)
    out = tmp_path / "o"
    args = ["-n", "8", "--shard-size", "4", "--batch-size", "4", "--steps", "2", "--device", "cpu"]
    result = cli("extract", "--teacher", models.pt, *args, "-o", out)
    assert result.exit_code == 1, result.stderr
    one_error_line(result, "non-finite loss at step 1", "images 4-7", "finished shards are kept", command="extract",
                   last=True)  # fmt: skip
    assert result.lines == [str(out / "shard-00000.h5")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["images"] == 4
    assert sorted(p.name for p in out.glob("*.h5")) == ["shard-00000.h5"] and not list(out.glob("*.partial"))
    refused = cli("stats", out)
    assert refused.exit_code == 2 and "incomplete" in refused.stderr
    assert cli("stats", out, "--allow-incomplete").exit_code == 0
    # every pass made was counted: shard 0 in full, one step of the poisoned batch
    assert ledger_of(out)["queries"] == 4 * (2 + 1) + 4


def test_a_step_that_overflows_is_caught_before_anything_is_written(cli, models, tmp_path):
    out = tmp_path / "o"
    result = cli("extract", "--teacher", models.pt, *TINY, "--step-size", "1e39", "--eps", "1", "-o", out)
    assert result.exit_code == 1, result.stderr
    one_error_line(result, "non-finite images at step 1", "lower --step-size", command="extract", last=True)
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()
    assert ledger_of(out)["queries"] == 4  # the one step made is on the account


def test_an_existing_output_directory(cli, models, make_shard, tmp_path):
    out = tmp_path / "o"
    args = ["extract", "--teacher", models.pt, "--method", "class-impressions", *TINY]
    assert cli(*args, "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.h5")}
    images = columns(out)["images"]
    spent = ledger_of(out)["queries"]
    # the same command again: complete, nothing to do, the paths printed again, nothing paid
    again = cli(*args, "-o", out)
    assert again.exit_code == 0 and again.lines == [str(out / n) for n in sorted(before)]
    assert "nothing to do" in again.stderr and ledger_of(out)["queries"] == spent
    # other arguments: refused, nothing touched
    other = cli(*args, "--seed", "1", "-o", out)
    assert other.exit_code == 2
    one_error_line(other, "holds the complete output of", "--overwrite", command="extract", last=True)
    assert {p.name: p.read_bytes() for p in out.glob("*.h5")} == before
    # a directory of someone else's shards: refused
    make_shard("theirs.h5", directory=tmp_path / "theirs", manifest=False)
    theirs = cli(*args, "-o", tmp_path / "theirs")
    assert theirs.exit_code == 2
    one_error_line(theirs, "already holds 1 shard(s)", command="extract", last=True)
    # a file: refused
    (tmp_path / "file").write_text("x")
    assert cli(*args, "-o", tmp_path / "file").exit_code == 2
    # --overwrite redoes it with the new arguments
    redone = cli(*args, "--seed", "1", "--overwrite", "-o", out)
    assert redone.exit_code == 0, redone.stderr
    assert not np.array_equal(columns(out)["images"], images)
    assert ledger_of(out)["queries"] == 2 * spent  # the ledger keeps the account of the directory


def test_a_budget_is_exact_and_one_too_small_is_refused_before_anything_is_done(cli, models, tmp_path):
    cost = 10 * (STEPS + 1)
    small = cli("extract", "--teacher", models.pt, *TINY, "--queries", str(cost - 1), "-o", tmp_path / "small")
    assert small.exit_code == 2
    one_error_line(small, f"the budget has {cost - 1} teacher passes left", f"need {cost}", command="extract",
                   last=True)  # fmt: skip
    assert not (tmp_path / "small").exists()
    exact = cli("extract", "--teacher", models.pt, *TINY, "--queries", str(cost), "-o", tmp_path / "exact")
    assert exact.exit_code == 0, exact.stderr
    s = ledger_of(tmp_path / "exact")
    assert s["queries"] == s["budget"] == cost and s["remaining"] == 0


# ----------------------------------------------------------------------------- the pieces


def test_virtual_logits_follow_the_papers_distribution():
    from fakecifar.extract import virtual_logits

    rng = np.random.default_rng(0)
    targets = np.arange(4000) % 10
    v = virtual_logits(targets, 10, rng)
    assert v.dtype == np.float32 and v.shape == (4000, 10)
    top = v[np.arange(4000), targets]
    assert abs(top.mean() - 20) < 0.1 and abs(top.std() - 2) < 0.1 and (v.argmax(1) == targets).all()
    others = np.sort(np.delete(v, targets + 10 * np.arange(4000)).reshape(4000, 9), axis=1)
    # in sorted order, the others' means sit near the evenly spread mu (order statistics pull the ends out)
    assert np.all(np.diff(others.mean(0)) > 0) and abs(others.mean()) < 0.05
    # the mu go to the classes in a random order: each class is sometimes low, sometimes high
    low = np.delete(v, targets + 10 * np.arange(4000)).reshape(4000, 9).argmin(1)
    assert len(set(low.tolist())) == 9


def test_class_similarity_and_dirichlet_targets():
    from fakecifar.extract import class_similarity, dirichlet_targets

    w = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2]])
    sim = class_similarity(w)
    assert np.allclose(np.diag(sim), 1) and np.allclose(sim.min(1), 0) and sim[0, 1] > 0.9
    classes = np.repeat(np.arange(3), 200)
    for beta in (1.0, 0.1):
        soft = dirichlet_targets(classes, sim, np.full(len(classes), beta), np.random.default_rng(0))
        assert soft.dtype == np.float32 and np.allclose(soft.sum(1), 1) and np.isfinite(soft).all()
        assert (soft[classes == 2].argmax(1) == 2).mean() > 0.9  # no similar class: peaked on itself
        assert soft[classes == 0][:, 1].mean() > soft[classes == 0][:, 2].mean()  # mass on the similar class
