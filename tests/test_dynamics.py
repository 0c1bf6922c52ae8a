"""`train --dynamics FILE` and `--snapshots DIR`: every training image's margin, correctness and
error norm per epoch, recorded from the training pass itself, on real tiny shards; the scores
built on them (AUM, forgetting, EL2N) find flipped labels; the record survives SIGTERM and
--resume exactly; the per-epoch weights load."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from fakecifar.checkpoint import load_checkpoint
from fakecifar.manifest import describe_directory
from fakecifar.shards import ShardWriter, open_shards, pixel_sha256
from fakecifar.training.dynamics import Dynamics, aum, el2n, forgetting, read_dynamics

from helpers import one_error_line, signalled_run

FAST = ["--model", "resnet20", "--batch-size", "16", "--precision", "fp32", "--seed", "0"]
CLASSES = ["red", "green", "blue"]


def colour_set(directory: Path, n: int = 96, flipped: int = 0, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A learnable toy: each image's class is its saturated channel; the first `flipped` rows
    (after a seeded shuffle) get another class's label. Returns (dir, indices of flipped rows)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, (n, 8, 8, 3), dtype=np.uint8)
    truth = np.arange(n) % 3
    for c in range(3):
        images[truth == c, :, :, c] = 255
    labels = truth.copy()
    bad = rng.permutation(n)[:flipped]
    labels[bad] = (truth[bad] + 1) % 3
    directory.mkdir()
    with ShardWriter(directory / "s.h5", classes=CLASSES, image_size=(8, 8), producer="test") as w:
        w.add_batch(images, labels)
    describe_directory(directory)
    return directory, bad


def test_dynamics_and_snapshots_are_recorded_for_every_row_and_epoch(cli, tmp_path):
    data, _ = colour_set(tmp_path / "d")
    out, dyn, snaps = tmp_path / "m.pt", tmp_path / "dyn.h5", tmp_path / "snaps"
    r = cli("train", data, *FAST, "--epochs", "2", "--dynamics", dyn, "--snapshots", snaps, "-o", out)
    assert r.exit_code == 0, r.stderr
    d = read_dynamics(dyn)
    assert d.margin.shape == d.el2n.shape == d.correct.shape == (2, 96)
    assert (d.correct >= 0).all()  # 96 rows, batch 16: every row trained once per epoch
    assert np.isfinite(d.margin).all() and (d.el2n >= 0).all() and (d.el2n <= np.sqrt(2) + 1e-6).all()
    images = np.concatenate([c["images"] for _, c in open_shards([data]).iter_chunks(["images"])])
    assert (d.sha256 == pixel_sha256(images)).all()
    assert d.meta["epochs"] == 2 and "red" in d.meta["classes"]
    assert sorted(p.name for p in snaps.iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    model, meta = load_checkpoint(snaps / "epoch-002.pt")
    assert meta["classes"] == CLASSES


def test_scores_from_the_dynamics_find_flipped_labels(cli, tmp_path):
    data, bad = colour_set(tmp_path / "d", n=120, flipped=12)
    dyn = tmp_path / "dyn.h5"
    r = cli("train", data, *FAST, "--epochs", "6", "--lr", "0.05", "--dynamics", dyn, "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    d = read_dynamics(dyn)
    flagged_by = {
        "aum": np.argsort(aum(d), kind="stable")[:12],  # low margin: suspicious
        "el2n": np.argsort(-el2n(d), kind="stable")[:12],  # high error: suspicious
    }
    for name, flagged in flagged_by.items():
        precision = len(np.intersect1d(flagged, bad)) / 12
        assert precision >= 0.5, (name, precision)  # random flags ~0.1


def test_forgetting_counts_transitions_and_ranks_never_learned_rows_last():
    correct = np.array([[1, 0, 0, -1], [0, 0, 1, 1], [1, 0, 0, 1]], np.int8)  # [epochs, rows]
    d = Dynamics(np.zeros((3, 4)), np.zeros((3, 4)), correct, np.zeros(4, "S32"), {})
    # row 0: 1 -> 0 -> 1 one forgetting; row 1 never learned: 3 + 1; row 2: learned at 2, then
    # forgotten at 3; row 3: unseen at 1, then right.
    assert forgetting(d).tolist() == [1.0, 4.0, 1.0, 0.0]
    unseen = Dynamics(np.array([[1.0, 2.0]]), np.zeros((1, 2)), np.array([[1, -1]], np.int8), np.zeros(2, "S32"), {})
    assert aum(unseen)[1] == np.inf


def test_an_interrupted_run_records_the_same_dynamics_after_resume(cli, tmp_path):
    data, _ = colour_set(tmp_path / "d", n=64)
    args = [data, *FAST, "--batch-size", "8", "--epochs", "2"]  # 8 steps per epoch
    straight = tmp_path / "straight.h5"
    assert cli("train", *args, "--dynamics", straight, "-o", tmp_path / "s.pt").exit_code == 0
    out, dyn = tmp_path / "m.pt", tmp_path / "m.h5"
    run = signalled_run(
        "fakecifar.training.sources", (1, 3), ["train", *args, "--dynamics", dyn, "-o", out], signal.SIGTERM
    )
    assert run.returncode == 143, run.stderr
    assert read_dynamics(dyn).margin.shape[0] == 1  # the finished epoch only
    r = cli("train", "--resume", out, "--dynamics", dyn)
    assert r.exit_code == 0, r.stderr
    a, b = read_dynamics(straight), read_dynamics(dyn)
    np.testing.assert_array_equal(a.correct, b.correct)
    np.testing.assert_array_equal(a.margin, b.margin)
    np.testing.assert_array_equal(a.el2n, b.el2n)


def test_an_existing_dynamics_file_is_not_clobbered(cli, tmp_path):
    data, _ = colour_set(tmp_path / "d", n=24)
    dyn = tmp_path / "dyn.h5"
    dyn.write_bytes(b"precious")
    r = cli("train", data, *FAST, "--epochs", "1", "--dynamics", dyn, "-o", tmp_path / "m.pt")
    one_error_line(r, str(dyn), command="train")
    assert r.exit_code == 2 and dyn.read_bytes() == b"precious" and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("flag", ["--dynamics", "--snapshots"])
def test_distill_has_no_record_options(cli, flag):
    r = cli("distill", "--help")
    assert flag not in r.stdout


def test_dynamics_under_torchrun_is_refused_before_any_work(tmp_path):
    """A mid-epoch save under DDP holds rank 0's rows only: refused rather than recorded wrong."""
    from fakecifar.errors import UsageError
    from fakecifar.train import check_outputs, make_config
    from fakecifar.training.runtime import Dist

    with pytest.raises(UsageError, match="--dynamics records in one process"):
        check_outputs(tmp_path / "m.pt", make_config(), dist=Dist(0, 2, 0), dynamics=tmp_path / "d.h5")
    assert not list(tmp_path.iterdir())
