"""`fakecifar dropout`: the influence is exact (leave-one-out retraining of the last layer),
confident learning's formulas, each method end to end through the real CLI on a learnable toy
set with flipped labels (the methods find them, the random control does not), the kept shards
(every column and attribute, the exact count), --keep-scores / --scores, resume, the contact
sheet, and every refusal (exit 2, one line, nothing written or lost)."""

from __future__ import annotations

import functools
import hashlib
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import CLASSES3
from helpers import one_error_line as _one_error_line

one_error_line = functools.partial(_one_error_line, command="dropout")

torch = pytest.importorskip("torch")

N_TRAIN, N_VAL, N_FLIPPED = 120, 45, 12
PROXY = ["--proxy-epochs", "8", "--proxy-batch-size", "16", "--proxy-lr", "0.05", "--device", "cpu"]


def _toy(n: int, seed: int, flip: int = 0):
    """Learnable 8x8 images: class c has channel c bright. `flip` labels moved to another class."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % 3
    images = rng.integers(0, 100, (n, 8, 8, 3)).astype(np.uint8)
    for c in range(3):
        images[truth == c, :, :, c] += 120
    labels = truth.copy()
    flipped = np.zeros(n, bool)
    if flip:
        rows = rng.choice(n, flip, replace=False)
        labels[rows] = (truth[rows] + 1 + rng.integers(0, 2, flip)) % 3
        flipped[rows] = True
    return images, labels, flipped


def _write(directory, images, labels, *, classes=CLASSES3, shards=1, extra=True):
    from fakecifar.manifest import describe_directory
    from fakecifar.shards import ShardWriter, pixel_sha256

    directory.mkdir(parents=True)
    n = len(images)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        sl = slice(bounds[k], bounds[k + 1])
        columns = {"sha256": pixel_sha256(images[sl]), "origin": (np.arange(n)[sl] % 2).astype(np.uint8)}
        if extra:
            columns.update(
                prompt=np.array([f"a photo {i}" for i in range(n)][sl], dtype=object),
                seed=np.arange(n, dtype=np.int64)[sl] * 7,
                weight=np.linspace(0, 1, n, dtype=np.float32)[sl],
            )
        attrs = {"note": "toy set", "generator": "sd-1.4"} if extra else None
        with ShardWriter(
            directory / f"part-{k}.h5", classes=classes, image_size=images.shape[1:3], producer="test", attrs=attrs
        ) as w:
            w.add_batch(images[sl], labels[sl], **columns)
    describe_directory(directory, command="test fixture")
    return directory


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train/ (120 images in 2 shards, 12 labels flipped, extra columns and attributes), val/
    (45 clean images) and model.pt (a resnet20 trained on train/ for a few epochs)."""
    from fakecifar.shards import open_shards
    from fakecifar.train import make_config, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy")
    images, labels, flipped = _toy(N_TRAIN, 0, N_FLIPPED)
    _write(root / "train", images, labels, shards=2)
    v_images, v_labels, _ = _toy(N_VAL, 1)
    _write(root / "val", v_images, v_labels)
    config = make_config(model="resnet20", epochs=8, batch_size=16, device="cpu")
    train(open_shards([root / "train"]), root / "model.pt", config)
    return {
        "root": root,
        "train": root / "train",
        "val": root / "val",
        "model": root / "model.pt",
        "flipped": flipped,
        "labels": labels,
        "images": images,
    }


def _dropped_rows(out) -> list[int]:
    return [t["row"] for t in json.loads((out / "report.json").read_text())["top"]]


def _kept_hashes(out) -> list[bytes]:
    from fakecifar.shards import open_shards

    return open_shards([out]).read("sha256").tolist()


def _tree(path) -> dict:
    """Every file under `path` with its sha256: to show nothing was written or lost."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".fakecifar.lock"  # the lock notes its last holder
    }


# ----------------------------------------------------------------------------- influence is exact


def _ce_objective(theta, z, y, weights, l2):
    logits = z @ theta.view(3, -1).T
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return (weights * ce).sum() / len(y) + 0.5 * l2 * (theta**2).sum()


def _newton(theta, z, y, weights, l2, steps=12):
    theta = theta.clone()
    for _ in range(steps):
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_ce_objective(t, z, y, weights, l2), t)
        hess = torch.autograd.functional.hessian(lambda p: _ce_objective(p, z, y, weights, l2), theta)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta


def test_influence_matches_leave_one_out_retraining_of_the_last_layer():
    """Logistic regression on fixed features (the last layer on a frozen network): the predicted
    change of the total val loss when an image is removed, -score/N, is what retraining without
    it gives (exactly, not just in rank), and every score is finite."""
    from fakecifar.scores import last_layer_influence

    rng = np.random.default_rng(3)
    n, d, l2 = 40, 3, 1e-2
    centers = rng.normal(0, 1.5, (3, d))
    y = rng.integers(0, 3, n)
    phi = centers[y] + rng.normal(0, 1.0, (n, d))
    y[:4] = (y[:4] + 1) % 3  # a few wrong labels: the harmful ones
    y_val = rng.integers(0, 3, 30)
    phi_val = centers[y_val] + rng.normal(0, 1.0, (30, d))
    z = torch.from_numpy(np.c_[phi, np.ones(n)])
    z_val = torch.from_numpy(np.c_[phi_val, np.ones(30)])
    yt, yv = torch.from_numpy(y), torch.from_numpy(y_val)
    ones = torch.ones(n, dtype=torch.float64)
    theta = _newton(torch.zeros(3 * (d + 1), dtype=torch.float64), z, yt, ones, l2, steps=30)
    w = theta.view(3, d + 1).numpy()

    scores, details = last_layer_influence(phi, y, phi_val, y_val, w[:, :d], w[:, d], l2=l2, damping=0.0)
    assert np.isfinite(scores).all() and details["damping"] == pytest.approx(l2)

    def val_loss(t):
        return float(torch.nn.functional.cross_entropy(z_val @ t.view(3, -1).T, yv, reduction="sum"))

    base = val_loss(theta)
    changes = []
    for i in range(n):
        weights = ones.clone()
        weights[i] = 0
        changes.append(val_loss(_newton(theta, z, yt, weights, l2, steps=6)) - base)
    predicted = -scores / n
    actual = np.array(changes)
    assert np.corrcoef(predicted, actual)[0, 1] > 0.95
    slope = float(predicted @ actual / (predicted @ predicted))
    assert 0.8 < slope < 1.25  # the same size, not just the same ranking
    # the wrong labels are the harmful ones: removing them lowers the val loss
    assert {0, 1, 2, 3} <= set(np.argsort(-scores)[:5]) and (actual[:4] < 0).all()
    # and the score is exactly the derivative of the val loss in the example's weight
    # (central difference of retrained models with example i weighted 1 +- delta)
    delta = 1e-3
    for i in (0, 7, 21):
        moved = []
        for sign in (1, -1):
            weights = ones.clone()
            weights[i] += sign * delta
            moved.append(val_loss(_newton(theta, z, yt, weights, l2, steps=6)))
        derivative = (moved[0] - moved[1]) / (2 * delta / n)
        assert derivative == pytest.approx(scores[i], rel=1e-4, abs=1e-6)


def test_the_kronecker_hessian_is_the_exact_hessian_of_the_cross_entropy():
    from fakecifar.scores import last_layer_hessian, softmax

    rng = np.random.default_rng(0)
    n, d, c = 25, 4, 3
    phi, theta = rng.normal(size=(n, d)), rng.normal(size=(c, d + 1))
    y = torch.from_numpy(rng.integers(0, c, n))
    z = torch.from_numpy(np.c_[phi, np.ones(n)])
    exact = torch.autograd.functional.hessian(
        lambda t: torch.nn.functional.cross_entropy(z @ t.view(c, -1).T, y), torch.from_numpy(theta.reshape(-1))
    ).numpy()
    probs = softmax(np.c_[phi, np.ones(n)] @ theta.T)
    assert np.allclose(last_layer_hessian(phi, probs), exact, atol=1e-10)


def test_influence_is_finite_on_degenerate_features():
    """All-zero features, duplicates and saturated probabilities: never a NaN or an inf."""
    from fakecifar.scores import last_layer_influence

    phi = np.zeros((10, 5))
    phi[5:] = 1.0
    y = np.arange(10) % 2
    for scale in (0.0, 1.0, 1e3):
        w = np.full((2, 5), scale)
        w[1] *= -1
        scores, details = last_layer_influence(phi, y, phi[:4], y[:4], w, np.zeros(2), damping=1e-3)
        assert np.isfinite(scores).all() and details["damping"] > 0


# ----------------------------------------------------------------------------- confident learning


def test_confident_learning_thresholds_flags_and_ranking():
    from fakecifar.scores import confident_learning, stratified_folds

    probs = np.array(
        [
            [0.9, 0.1],  # labelled 0, confident 0
            [0.7, 0.3],  # labelled 0
            [0.2, 0.8],  # labelled 0, but confidently 1: flagged
            [0.1, 0.9],  # labelled 1
            [0.4, 0.6],  # labelled 1
            [0.55, 0.45],  # labelled 1, below t_1 but p_0 = 0.55 < t_0: not flagged
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    out = confident_learning(probs, labels)
    assert np.allclose(out["thresholds"], [(0.9 + 0.7 + 0.2) / 3, (0.9 + 0.6 + 0.45) / 3])
    assert out["flagged"].tolist() == [False, False, True, False, False, False]
    assert np.allclose(out["margin"], [-0.8, -0.4, 0.6, -0.8, -0.2, 0.1])
    assert int(np.argmax(out["score"])) == 2 and out["suggested"][2] == 1
    assert (out["score"][out["flagged"]] > out["score"][~out["flagged"]].max()).all()
    folds = stratified_folds(np.arange(30) % 3, 3, seed=0)
    assert np.bincount(folds).tolist() == [10, 10, 10]
    assert (stratified_folds(np.arange(30) % 3, 3, seed=0) == folds).all()


# ----------------------------------------------------------------------------- end to end


def _precision(out, flipped) -> float:
    rows = _dropped_rows(out)[:N_FLIPPED]
    return float(flipped[rows].mean())


def test_influence_with_a_proxy_finds_flipped_labels_and_random_does_not(cli, toy, tmp_path):
    """The documented command, proxy trained here: fakecifar dropout train --val val --score
    influence --drop N -o kept."""
    out = tmp_path / "kept"
    result = cli("dropout", toy["train"], "--val", toy["val"], "--score", "influence", "--drop", N_FLIPPED,
                 "-o", out, *PROXY)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out / "shard-00000.h5")]
    assert f"dropped {N_FLIPPED} of {N_TRAIN} images" in result.stderr and "harmful.png" in result.stderr
    assert _precision(out, toy["flipped"]) >= 0.75
    summary = json.loads((out / "report.json").read_text())
    assert summary["cost"]["models_trained"] == 1 and summary["cost"]["training_epochs"] == 8
    assert summary["cost"]["images_scored"] == N_TRAIN and summary["cost"]["seconds"] > 0
    assert summary["details"]["hessian"] == "195x195"  # 3 classes x (64 features + bias)
    assert not (out / ".dropout-work").exists() and not (out / "scores.npz").exists()

    control = cli("dropout", toy["train"], "--score", "random", "--drop", N_FLIPPED, "-o", tmp_path / "random")
    assert control.exit_code == 0, control.stderr
    assert _precision(tmp_path / "random", toy["flipped"]) <= 0.4  # base rate 0.1


def test_confident_with_k_fold_proxies_finds_flipped_labels(cli, toy, tmp_path):
    out = tmp_path / "kept"
    result = cli(
        "dropout", toy["train"], "--score", "confident", "--folds", "3", "--drop", N_FLIPPED, "-o", out, *PROXY
    )
    assert result.exit_code == 0, result.stderr
    assert _precision(out, toy["flipped"]) >= 0.75
    summary = json.loads((out / "report.json").read_text())
    assert summary["cost"]["models_trained"] == 3 and summary["cost"]["training_epochs"] == 24
    assert summary["details"]["flagged"] >= N_FLIPPED // 2 and len(summary["details"]["thresholds"]) == 3
    assert "confident learning flags" in result.stderr


def test_random_control_is_seeded(cli, toy, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = cli(
            "dropout", toy["train"], "--score", "random", "--drop", "10%", "--seed", seed, "-o", tmp_path / name
        )
        assert result.exit_code == 0, result.stderr
        runs[name] = _dropped_rows(tmp_path / name)
    assert runs["a"] == runs["b"] != runs["c"] and len(runs["a"]) == 12


def test_kept_shards_keep_every_column_and_attribute_and_the_exact_count(cli, toy, tmp_path):
    from fakecifar.shards import Shard, open_shards

    out = tmp_path / "kept"
    result = cli("dropout", toy["train"], "--val", toy["val"], "--score", "influence", "--model", toy["model"],
                 "--drop", "25%", "-o", out, "--shard-size", "40")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out / f"shard-{k:05d}.h5") for k in range(3)]
    source = open_shards([toy["train"]])
    kept = open_shards([out])
    assert len(kept) == N_TRAIN - 30 and [len(s) for s in kept.shards] == [40, 40, 10]
    assert kept.columns == source.columns == ("images", "labels", "origin", "prompt", "seed", "sha256", "weight")
    dropped = set(_dropped_rows(out)[:30])
    rows = np.array([i for i in range(N_TRAIN) if i not in dropped])
    for column in source.columns:
        assert np.array_equal(kept.read(column), source.read(column)[rows]), column
    shard = Shard(out / "shard-00000.h5")
    assert shard.attrs["note"] == "toy set" and shard.attrs["generator"] == "sd-1.4" and shard.classes == CLASSES3
    step = json.loads(shard.attrs["provenance"])[-1]
    assert step["step"] == "dropout" and step["method"] == "influence" and step["dropped"] == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 90
    summary = json.loads((out / "report.json").read_text())
    assert sum(r["dropped"] for r in summary["per_class"]) == 30 == sum(r["dropped"] for r in summary["per_origin"])
    assert [r["name"] for r in summary["per_origin"]] == ["real", "fake"]
    assert sum(summary["histogram"]["counts"]) == N_TRAIN and sum(summary["histogram"]["dropped"]) == 30
    assert summary["cost"]["models_trained"] == 0 and summary["cost"]["forward_images"] == N_TRAIN + N_VAL
    # the same command again is a no-op that prints the same paths
    again = cli("dropout", toy["train"], "--val", toy["val"], "--score", "influence", "--model", toy["model"],
                "--drop", "25%", "-o", out, "--shard-size", "40")  # fmt: skip
    assert again.exit_code == 0 and again.lines == result.lines and "nothing to do" in again.stderr


def test_keep_scores_then_scores_file_filters_again_without_rescoring(cli, toy, tmp_path):
    base = ["dropout", toy["train"], "--val", toy["val"]]
    scored = cli(*base, "--score", "influence", "--model", toy["model"], "--drop", 10, "-o", tmp_path / "a",
                 "--keep-scores")  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    scores_file = tmp_path / "a" / "scores.npz"
    with np.load(scores_file) as npz:
        assert npz["scores"].shape == (N_TRAIN,) and npz["sha256"].dtype == np.dtype("S32")
    again = cli(*base, "--scores", scores_file, "--drop", 10, "-o", tmp_path / "b")
    rescored = cli(*base, "--score", "influence", "--model", toy["model"], "--drop", 10, "-o", tmp_path / "c")
    assert again.exit_code == 0 and rescored.exit_code == 0, again.stderr + rescored.stderr
    assert _kept_hashes(tmp_path / "a") == _kept_hashes(tmp_path / "b") == _kept_hashes(tmp_path / "c")
    assert "models_trained" not in again.stderr and "when scored" in again.stderr
    more = cli(*base, "--scores", scores_file, "--drop", "20%", "-o", tmp_path / "d", "--json")
    assert more.exit_code == 0, more.stderr
    (report,) = more.json_lines()
    assert report["dropped"] == 24 and report["shards"] == [str(tmp_path / "d" / "shard-00000.h5")]
    assert set(_dropped_rows(tmp_path / "a")[:10]) <= set(_dropped_rows(tmp_path / "d"))
    mismatch = cli(*base, "--scores", scores_file, "--score", "random", "--drop", 10, "-o", tmp_path / "e")
    assert mismatch.exit_code == 2 and "holds influence scores" in mismatch.stderr


def test_an_interrupted_run_resumes_to_the_same_output(toy, tmp_path):
    from fakecifar.dropout import dropout
    from fakecifar.shards import open_shards

    def run(out, on_shard=None):
        return dropout(open_shards([toy["train"]]), out, method="random", drop=20, shard_size=25, on_shard=on_shard,
                       seed=3)  # fmt: skip

    reference = run(tmp_path / "ref")

    def boom(path):
        if path.name == "shard-00001.h5":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", boom)
    assert (tmp_path / "out" / "scores.npz").exists() and not (tmp_path / "out" / "report.json").exists()
    resumed = run(tmp_path / "out")
    assert resumed.scores_from == "resumed" and resumed.resumed_images == 50
    assert _kept_hashes(tmp_path / "out") == _kept_hashes(tmp_path / "ref")
    assert [p.name for p in resumed.shards] == [p.name for p in reference.shards]
    assert not (tmp_path / "out" / "scores.npz").exists()


def test_contact_sheet_shows_the_most_harmful_images_upscaled(cli, toy, tmp_path):
    from fakecifar.dropout import sheet_geometry

    out = tmp_path / "kept"
    result = cli("dropout", toy["train"], "--score", "random", "--drop", 20, "--sheet", 10, "-o", out)
    assert result.exit_code == 0, result.stderr
    sheet = Image.open(out / "harmful.png")
    # 8x8 images are upscaled 12x to 96 px in 136 px cells, 8 per row: 2 rows of 3 caption lines
    assert sheet_geometry(10, (8, 8)) == {
        "scale": 12, "cell_w": 136, "cell_h": 96 + 3 * 15 + 4, "cols": 8, "rows": 2,
        "width": 2 * 8 + 8 * 136 + 7 * 8, "height": 2 * 8 + 36 + 2 * 145 + 8,
    }  # fmt: skip
    assert sheet.size == (1160, 350)
    first = _dropped_rows(out)[0]
    top_left = np.asarray(sheet.convert("RGB"))[8 + 36 : 8 + 36 + 96, 8 : 8 + 96]
    assert np.array_equal(top_left, np.kron(toy["images"][first], np.ones((12, 12, 1), np.uint8)))
    below = np.asarray(sheet.convert("L"))[8 + 36 + 96 : 8 + 36 + 145, 8 : 8 + 136]
    assert (below < 128).sum() > 100  # the captions are drawn (dark text on white)
    none = cli("dropout", toy["train"], "--score", "random", "--drop", 20, "--sheet", 0, "-o", tmp_path / "none")
    assert none.exit_code == 0 and not (tmp_path / "none" / "harmful.png").exists()


# ----------------------------------------------------------------------------- refusals


def _refused(cli, toy, out, *args, needles=()):
    before = _tree(toy["root"])
    result = cli("dropout", *args)
    assert result.exit_code == 2, result.stderr
    one_error_line(result, *needles)
    assert not result.stdout
    assert _tree(toy["root"]) == before  # nothing lost
    return result


@pytest.mark.parametrize(
    "drop, needle",
    [
        ("0", "drops nothing"),
        ("0%", "drops nothing"),
        ("121", "more than the 120 images"),
        ("120", "would drop all 120"),
        ("100%", "would drop every image"),
        ("abc", "bad --drop 'abc'"),
        ("5.5", "whole number"),
        ("-3", "bad --drop '-3'"),
        ("0.1%", "is 0 images"),
    ],
)
def test_bad_drop_is_refused(cli, toy, tmp_path, drop, needle):
    out = tmp_path / "out"
    _refused(cli, toy, out, toy["train"], "--score", "random", "--drop", drop, "-o", out, needles=("--drop", needle))
    assert not out.exists()


def test_val_of_other_classes_or_size_is_refused(cli, toy, tmp_path):
    images, labels, _ = _toy(20, 5)
    other = _write(tmp_path / "other", images, labels, classes=["a", "b", "c"], extra=False)
    big = _write(tmp_path / "big", np.repeat(np.repeat(images, 2, 1), 2, 2), labels, extra=False)
    out = tmp_path / "out"
    for val, needle in ((other, "classes"), (big, "16x16")):
        _refused(cli, toy, out, toy["train"], "--val", val, "--score", "influence", "--model", toy["model"],
                 "--drop", 5, "-o", out, needles=("--val", str(val), needle))  # fmt: skip
    assert not out.exists()
    _refused(cli, toy, out, toy["train"], "--score", "influence", "--drop", 5, "-o", out, needles=("needs --val",))


def test_scores_of_another_dataset_are_refused(cli, toy, tmp_path):
    scored = cli("dropout", toy["train"], "--score", "random", "--drop", 5, "-o", tmp_path / "a", "--keep-scores")
    assert scored.exit_code == 0, scored.stderr
    scores_file = tmp_path / "a" / "scores.npz"
    images, labels, _ = _toy(N_TRAIN, 9)  # as many rows, other pixels
    other = _write(tmp_path / "other", images, toy["labels"], extra=False)
    relabelled = _write(tmp_path / "relabelled", toy["images"], (toy["labels"] + 1) % 3, extra=False)
    out = tmp_path / "out"
    for data, needle in ((other, "another dataset"), (relabelled, "another label"), (toy["val"], "the data has 45")):
        _refused(cli, toy, out, data, "--scores", scores_file, "--drop", 5, "-o", out,
                 needles=("--scores", str(scores_file), needle))  # fmt: skip
    assert not out.exists()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _refused(cli, toy, out, toy["train"], "--scores", tmp_path / "junk.npz", "--drop", 5, "-o", out,
             needles=("not a fakecifar scores file",))  # fmt: skip
    assert not out.exists()


def test_checkpoint_of_other_classes_or_kind_is_refused(cli, toy, tmp_path):
    from fakecifar.checkpoint import save_checkpoint
    from fakecifar.models import build_model

    other = save_checkpoint(tmp_path / "other.pt", build_model("resnet20", 3), arch="resnet20", classes=["a", "b", "c"],
                            mean=[0.5] * 3, std=[0.25] * 3, input_size=8)  # fmt: skip
    (tmp_path / "m.onnx").write_bytes(b"x")
    out = tmp_path / "out"
    common = [toy["train"], "--val", toy["val"], "--drop", 5, "-o", out]
    _refused(cli, toy, out, *common, "--score", "influence", "--model", other, needles=(str(other), "classes"))
    _refused(cli, toy, out, *common, "--score", "influence", "--model", tmp_path / "m.onnx", needles=(".onnx",))
    _refused(cli, toy, out, *common, "--score", "random", "--model", toy["model"], needles=("uses no model",))
    _refused(cli, toy, out, *common, "--score", "influence", "--model", toy["model"], "--proxy-epochs", 2,
             needles=("--proxy-epochs",))  # fmt: skip
    _refused(cli, toy, out, *common, "--score", "confident", "--model", toy["model"], needles=("in-sample",))
    _refused(cli, toy, out, *common, "--score", "influence", "--proxy-epochs", 0, needles=("--proxy-epochs",))
    assert not out.exists()


def test_an_output_that_exists_is_refused(cli, toy, tmp_path):
    out = tmp_path / "out"
    first = cli("dropout", toy["train"], "--score", "random", "--drop", 5, "-o", out)
    assert first.exit_code == 0, first.stderr
    before = _tree(out)
    _refused(cli, toy, out, toy["train"], "--score", "random", "--drop", 6, "-o", out,
             needles=(str(out), "complete output"))  # fmt: skip
    assert _tree(out) == before
    replaced = cli("dropout", toy["train"], "--score", "random", "--drop", 6, "-o", out, "--overwrite")
    assert replaced.exit_code == 0 and json.loads((out / "report.json").read_text())["dropped"] == 6
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(
        cli, toy, a_file, toy["train"], "--score", "random", "--drop", 5, "-o", a_file, needles=("not a directory",)
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with h5py.File(foreign / "x.h5", "w"):
        pass
    _refused(cli, toy, foreign, toy["train"], "--score", "random", "--drop", 5, "-o", foreign,
             needles=("already holds 1 shard",))  # fmt: skip
    assert list(_tree(foreign)) == ["x.h5"]  # (the lock file is the dataset writer's, as for split)


def test_unlabelled_images_and_unknown_methods_are_refused(cli, toy, tmp_path):
    images, labels, _ = _toy(20, 4)
    labels[3] = -1
    unlabelled = _write(tmp_path / "unl", images, labels, extra=False)
    out = tmp_path / "out"
    _refused(cli, toy, out, unlabelled, "--score", "random", "--drop", 2, "-o", out, needles=("no label", "image 3"))
    every = "influence, confident, aum, forgetting, el2n, tracin, random"
    _refused(cli, toy, out, toy["train"], "--score", "lissa", "--drop", 2, "-o", out,
             needles=("unknown --score 'lissa'", every))  # fmt: skip
    _refused(cli, toy, out, toy["train"], "--drop", 2, "-o", out, needles=("no --score",))
    assert not out.exists()


@pytest.mark.parametrize("method", ["aum", "forgetting", "el2n", "tracin"])
def test_training_dynamics_methods_find_flipped_labels_from_their_proxys_own_training(cli, toy, tmp_path, method):
    """aum, forgetting and el2n read the proxy's --dynamics record (no extra pass); tracin its
    --snapshots. Each beats the random control (base rate 0.1) on the flipped labels."""
    out = tmp_path / "kept"
    val = ["--val", toy["val"]] if method == "tracin" else []
    result = cli("dropout", toy["train"], *val, "--score", method, "--drop", N_FLIPPED, "-o", out, *PROXY)
    assert result.exit_code == 0, result.stderr
    # forgetting ties many rows at 0 in 8 epochs; tracin toward the val loss is the weakest here
    floor = 0.3 if method in ("forgetting", "tracin") else 0.5
    assert _precision(out, toy["flipped"]) >= floor, method
    summary = json.loads((out / "report.json").read_text())
    assert summary["cost"]["models_trained"] == 1 and summary["cost"]["training_epochs"] == 8


def test_training_dynamics_methods_refuse_a_model(cli, toy, tmp_path):
    model = tmp_path / "m.pt"
    assert cli("train", toy["train"], "--model", "resnet20", "--epochs", "1", "-o", model).exit_code == 0
    out = tmp_path / "kept"
    result = cli("dropout", toy["train"], "--score", "aum", "--model", model, "--drop", "2", "-o", out)
    assert result.exit_code == 2 and "trains its own" in result.stderr and not out.exists()


@pytest.fixture(scope="module")
def recorded(toy, tmp_path_factory):
    """One training on the toy with the proxy's recipe (PROXY), recording --dynamics and
    --snapshots as `train` does."""
    from fakecifar.shards import open_shards
    from fakecifar.train import make_config, train

    root = tmp_path_factory.mktemp("recorded")
    config = make_config(model="resnet20", epochs=8, batch_size=16, lr=0.05, device="cpu", seed=0)
    train(open_shards([toy["train"]]), root / "m.pt", config, dynamics=root / "dyn.h5", snapshots=root / "snaps")
    return {"dynamics": root / "dyn.h5", "snapshots": root / "snaps", "model": root / "m.pt"}


@pytest.mark.parametrize("method", ["aum", "el2n", "tracin"])
def test_scores_from_an_earlier_trainings_record_train_nothing(cli, toy, recorded, tmp_path, method):
    """Train once with --dynamics/--snapshots, score with any of their methods: no proxy."""
    out = tmp_path / "kept"
    record = ["--snapshots", recorded["snapshots"], "--val", toy["val"]] if method == "tracin" else [
        "--dynamics", recorded["dynamics"]]  # fmt: skip
    result = cli("dropout", toy["train"], "--score", method, *record, "--drop", N_FLIPPED, "-o", out)
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "report.json").read_text())
    assert summary["cost"]["models_trained"] == 0 and summary["cost"]["training_epochs"] == 0
    assert _precision(out, toy["flipped"]) >= (0.3 if method == "tracin" else 0.5), method
    # the same scores as the proxy that trains the same recipe here (training is deterministic)
    again = tmp_path / "again"
    val = ["--val", toy["val"]] if method == "tracin" else []
    assert cli("dropout", toy["train"], "--score", method, *val, "--drop", N_FLIPPED, "-o", again, *PROXY,
               "--keep-scores").exit_code == 0  # fmt: skip
    assert _dropped_rows(out) == _dropped_rows(again)


def test_records_of_other_images_or_methods_are_refused(cli, toy, recorded, tmp_path, make_shard):
    out = tmp_path / "kept"
    other = make_shard("other.h5", n=N_TRAIN, classes=CLASSES3)
    dyn = recorded["dynamics"]
    _refused(cli, toy, out, other, "--score", "aum", "--dynamics", dyn, "--drop", 2, "-o", out,
             needles=(str(dyn), "recorded on other images"))  # fmt: skip
    _refused(cli, toy, out, toy["train"], "--score", "influence", "--dynamics", dyn, "--val", toy["val"],
             "--drop", 2, "-o", out, needles=("--dynamics is read by --score aum/forgetting/el2n",))  # fmt: skip
    _refused(cli, toy, out, toy["train"], "--score", "aum", "--dynamics", dyn, "--proxy-epochs", 2, "--drop", 2,
             "-o", out, needles=("replaces the proxy",))  # fmt: skip
    _refused(cli, toy, out, toy["train"], "--score", "aum", "--dynamics", toy["model"], "--drop", 2, "-o", out,
             needles=("not a record written by train --dynamics",))  # fmt: skip
    _refused(cli, toy, out, toy["train"], "--score", "tracin", "--val", toy["val"], "--snapshots", tmp_path,
             "--drop", 2, "-o", out, needles=("no epoch-*.pt",))  # fmt: skip
    assert not out.exists()
