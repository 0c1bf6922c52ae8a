"""`train --adapt-bn` (AdaBN) and `train --pseudo-label` (self-training) on unlabelled target
images: the statistics and the deliverable, the rounds and their shards, the refusals, and a
resume that does not redo finished rounds. Tiny real data: a learnable toy problem (the class is
the colour channel that dominates), the target domain a brightness/contrast shift of it."""

from __future__ import annotations

import functools
import os
import signal
from typing import TYPE_CHECKING

import numpy as np
import pytest

from helpers import one_error_line as _one_error_line

if TYPE_CHECKING:
    from torch import Tensor

one_error_line = functools.partial(_one_error_line, command="train", last=True)
only_line = functools.partial(_one_error_line, command="train")  # stderr is the error alone

torch = pytest.importorskip("torch")

COLOURS = ["red", "green", "blue"]
FAST = ["--model", "resnet20", "--batch-size", "16", "--precision", "fp32", "--lr", "0.05"]


def colour_images(n: int, seed: int, *, scale: float = 1.0, shift: float = 0.0, size=(8, 8)):
    """(uint8 images, labels): class c has channel c raised by 60-140 over a noisy background;
    `scale`/`shift` change contrast and brightness (the target domain)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    pixels = rng.uniform(0, 110, (n, *size, 3))
    pixels[np.arange(n), :, :, labels] += rng.uniform(60, 140, n)[:, None, None]
    return np.clip(pixels * scale + shift, 0, 255).astype(np.uint8), labels


SHIFT = {"scale": 0.5, "shift": 70.0}


@pytest.fixture
def domains(make_shard, tmp_path):
    """Labelled source shards, an unlabelled shifted target (its true labels kept aside for the
    test), and a separate labelled split of the shifted domain for --val."""

    def shard(name, n, seed, labels=None, classes=COLOURS, **shift):
        images, truth = colour_images(n, seed, **shift)
        d = tmp_path / name
        d.mkdir()
        path = make_shard(
            f"{name}.h5", images=images, labels=truth if labels is None else labels, classes=classes, directory=d
        )
        return path, truth

    source, _ = shard("source", 96, 0)
    # Unlabelled (-1), as real target images would be, and with no class list of their own.
    target, truth = shard("target", 90, 1, labels=np.full(90, -1), classes=["unlabelled"], **SHIFT)
    val, _ = shard("val", 30, 2, **SHIFT)
    return {"source": source, "target": target, "truth": truth, "val": val}


def _normalized(images: np.ndarray, meta: dict) -> Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- AdaBN


def test_adapt_batchnorm_is_a_cumulative_average_that_changes_no_weight():
    from fakecifar.training.adapt import adapt_batchnorm, balanced_batch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.Dropout(0.5), torch.nn.Flatten()
    )
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    x = torch.randn(12, 3, 6, 6) * 3 + 1
    assert adapt_batchnorm(model, [x[:4], x[4:8], (x[8:],)]) == 12  # equal batches (a tuple is a batch too)
    bn = model[1]
    with torch.no_grad():
        a = model[0](x)
    assert torch.allclose(bn.running_mean, a.mean((0, 2, 3)), atol=1e-5)  # the mean of equal-size batch means
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 3 and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert [balanced_batch(n, 256) for n in (1, 90, 256, 257, 513)] == [1, 90, 256, 129, 171]


def test_adapt_bn_delivers_the_model_with_target_statistics(cli, domains, tmp_path):
    from fakecifar.checkpoint import OnnxClassifier, _torch_load, load_checkpoint
    from fakecifar.shards import open_shards
    from fakecifar.train import first_conv
    from fakecifar.training.adapt import batchnorm_layers

    out = tmp_path / "m.pt"
    r = cli("train", domains["source"], *FAST, "--epochs", "1", "-o", out, "--adapt-bn", domains["target"], "--onnx")
    assert r.exit_code == 0, r.stderr
    assert r.lines == [str(out), str(tmp_path / "m.onnx")]
    assert "adapted 19 BatchNorm layers on 90 target images" in r.stderr
    model, meta = load_checkpoint(out)
    adapt = meta["train"]["adapt"]
    assert adapt["bn"] == {
        "target": [str(domains["target"])],
        "adapted": True,
        "images": 90,
        "layers": 19,
        "batch": 90,
        "round": 0,
    }
    assert adapt["finalized"] and adapt["pseudo"] is None
    # The first BatchNorm's running statistics are those of the target images (one batch of 90).
    target = open_shards([domains["target"]]).read("images")
    x = _normalized(target, meta)
    conv = first_conv(model)
    assert conv is not None
    with torch.no_grad():
        a = conv(x)
    bn = batchnorm_layers(model)[0]
    assert torch.allclose(bn.running_mean, a.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, a.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    source = open_shards([domains["source"]]).read("images")
    with torch.no_grad():
        s = conv(_normalized(source, meta))
    assert not torch.allclose(bn.running_mean, s.mean((0, 2, 3)), atol=1e-2)  # not the source's
    # No weight changed: the deliverable is the trained weights (no --val, no EMA) but for BN statistics.
    raw = _torch_load(out, "cpu")
    trained = raw["resume"]["model"]
    for name, value in raw["state_dict"].items():
        if "running_" in name or "num_batches" in name:
            continue
        assert torch.equal(value, trained[name]), name
    assert any(not torch.equal(raw["state_dict"][k], trained[k]) for k in raw["state_dict"] if "running_mean" in k)
    # The .onnx is the adapted model.
    x01 = target.transpose(0, 3, 1, 2).astype(np.float32) / 255
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(OnnxClassifier(tmp_path / "m.onnx").predict_logits(x01), expected, atol=1e-4)


# ----------------------------------------------------------------------------- self-training


def test_pseudo_label_rounds_write_mostly_right_shards(cli, domains, tmp_path):
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.shards import open_shards

    out = tmp_path / "m.pt"
    args = ["--val", domains["val"], "--pseudo-label", domains["target"], "--threshold", "0.8", "--rounds", "2"]
    r = cli("train", domains["source"], *FAST, "--epochs", "3", "-o", out, *args, "--log", tmp_path / "log.jsonl")
    assert r.exit_code == 0, r.stderr
    assert r.lines == [str(out)]
    assert f"per-round accuracy on --val {domains['val']}" in r.stderr
    _, meta = load_checkpoint(out)
    adapt = meta["train"]["adapt"]
    assert adapt["round"] == 2 and adapt["finalized"] and adapt["val"] == [str(domains["val"])]
    assert adapt["pseudo"]["threshold"] == 0.8 and adapt["pseudo"]["rounds"] == 2
    assert meta["train"]["data"] == [str(domains["source"])]  # what --resume reads back
    records = adapt["records"]
    assert [rec["round"] for rec in records] == [0, 1, 2] and all("val_acc" in rec for rec in records)
    for k in (1, 2):
        rec = records[k]
        directory = tmp_path / "m.pt.pseudo" / f"round-{k}"
        assert rec["shards"] == str(directory)
        kept = open_shards([directory])  # a complete dataset, by its manifest
        labels, rows = kept.read("labels"), kept.read("target_row")
        confidence = kept.read("confidence")
        assert len(kept) == rec["kept"] > 0.5 * 90 and confidence.dtype == np.float32 and confidence.min() >= 0.8
        assert rec["per_class"] == {c: int((labels == i).sum()) for i, c in enumerate(COLOURS)}
        assert np.mean(labels == domains["truth"][rows]) >= 0.9  # mostly right
        assert f"round {k}/2: kept {rec['kept']} of 90 target images (p >= 0.8)" in r.stderr
        assert f"round {k}/2: val_acc {100 * rec['val_acc']:.2f}%" in r.stderr
    log = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 9 and '"round": 2' in log[-1]


def test_pseudo_label_keep_fraction_is_class_balanced_and_resumes_with_its_rule(cli, domains, tmp_path):
    """--keep-fraction F keeps ceil(F * n_c) of the n_c target images predicted as each class c,
    the most confident ones, whatever their probabilities; a resume keeps the recorded rule."""
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.shards import open_shards

    out = tmp_path / "m.pt"
    args = ["--pseudo-label", domains["target"], "--keep-fraction", "0.5", "--rounds", "1"]
    r = cli("train", domains["source"], *FAST, "--epochs", "2", "--label-smoothing", "0.3", "-o", out, *args)
    assert r.exit_code == 0, r.stderr
    adapt = load_checkpoint(out)[1]["train"]["adapt"]
    assert adapt["pseudo"]["keep_fraction"] == 0.5 and adapt["pseudo"]["threshold"] is None
    assert "(the top 0.5 of each predicted class)" in r.stderr
    kept = open_shards([tmp_path / "m.pt.pseudo" / "round-1"])
    assert adapt["records"][1]["kept"] == len(kept) >= 90 // 2  # ceil per class: at least half
    # capped by label smoothing (1 - 0.3 + 0.3 / 3): a --threshold 0.9 would have kept nothing
    assert kept.read("confidence").max() < 0.8 + 1e-4
    # More rounds later: the rule is read back from the checkpoint (no --keep-fraction given).
    r = cli("train", "--resume", out, "--pseudo-label", domains["target"], "--rounds", "2")
    assert r.exit_code == 0, r.stderr
    adapt = load_checkpoint(out)[1]["train"]["adapt"]
    assert adapt["round"] == 2 and adapt["pseudo"]["keep_fraction"] == 0.5
    assert "round 2/2: kept" in r.stderr and "(the top 0.5 of each predicted class)" in r.stderr


def test_keep_fraction_takes_the_most_confident_of_each_predicted_class(monkeypatch):
    from fakecifar.training import adapt

    confidence = np.array([0.9, 0.2, 0.5, 0.6, 0.3, 0.31, 0.99], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    monkeypatch.setattr(adapt, "predict", lambda model, batches, tta: (confidence, labels))  # the selection alone
    model = torch.nn.Identity()  # unused: predict is replaced
    chosen = adapt.pseudo_labels(model, [], None, fraction=0.5)
    by_threshold = adapt.pseudo_labels(model, [], 0.55)
    assert chosen.rows.tolist() == [0, 2, 3, 5, 6]  # ceil(0.5 * 3) = 2 per class of 3, ceil(0.5) = 1
    assert by_threshold.rows.tolist() == [0, 3, 6]


def test_bad_adapt_requests_are_refused_before_anything_is_written(cli, domains, make_shard, tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.pt"
    src, tgt, val = domains["source"], domains["target"], domains["val"]
    big = make_shard("big.h5", images=colour_images(6, 3, size=(16, 16))[0], classes=COLOURS)
    cases = [
        (["--pseudo-label", tgt, "--threshold", "0"], "--threshold must be in (0, 1], got 0.0"),
        (["--pseudo-label", tgt, "--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
        (["--pseudo-label", tgt, "--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--threshold", "0.9"], "--threshold needs --pseudo-label"),
        (["--adapt-bn", tgt, "--rounds", "2"], "--rounds needs --pseudo-label"),
        (["--pseudo-label", tgt, "--val", tgt], f"--val {tgt} is also a --pseudo-label target"),
        (["--pseudo-label", big], "--pseudo-label"),
        (["--adapt-bn", big, "--val", val], "--adapt-bn"),
        (["--adapt-bn", tgt, "--model", "lenet5"], "--adapt-bn: lenet5 has no BatchNorm"),
        (["--pseudo-label", tgt, "--target", "origin"], "--pseudo-label predicts classes"),
        (["--keep-fraction", "0.5"], "--keep-fraction needs --pseudo-label"),
        (["--pseudo-label", tgt, "--keep-fraction", "0"], "--keep-fraction must be in (0, 1], got 0.0"),
        (["--pseudo-label", tgt, "--keep-fraction", "0.5", "--threshold", "0.9"], "give one"),
    ]
    for extra, needle in cases:
        r = cli("train", src, *FAST, "--epochs", "1", "-o", out, *extra)
        assert r.exit_code == 2, (extra, r.stderr)
        only_line(r, needle)
        assert not (tmp_path / "out").exists(), extra
    r = cli("train", src, *FAST, "--epochs", "1", "-o", out, "--pseudo-label", big)
    only_line(r, "16x16", "8x8", "fakecifar resize")
    # An earlier run's rounds are not clobbered without --overwrite or --resume.
    (tmp_path / "out" / "m.pt.pseudo").mkdir(parents=True)
    r = cli("train", src, *FAST, "--epochs", "1", "-o", out, "--pseudo-label", tgt)
    assert r.exit_code == 2
    only_line(r, "m.pt.pseudo already exists", "--overwrite")
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    r = cli("train", src, *FAST, "--epochs", "1", "-o", out, "--adapt-bn", tgt)
    assert r.exit_code == 2
    only_line(r, "--adapt-bn and --pseudo-label run in one process")
    assert not out.exists()


def test_interrupted_pseudo_label_run_resumes_without_redoing_rounds(cli, domains, tmp_path):
    from fakecifar.checkpoint import _torch_load, load_checkpoint
    from fakecifar.shards import open_shards
    from fakecifar.train import TrainingInterrupted, make_config, train

    out = tmp_path / "m.pt"
    config = make_config(model="resnet20", batch_size=16, precision="fp32", lr=0.05, epochs=1, threshold=0.8, rounds=2)
    steps_per_round = 96 // 16  # round 0: one epoch of 6 steps
    seen = {"steps": 0}

    def on_step(count: int) -> None:  # Ctrl-C in the second step of round 1's training
        seen["steps"] += 1
        if seen["steps"] == steps_per_round + 2:
            os.kill(os.getpid(), signal.SIGINT)

    messages: list[str] = []
    with pytest.raises(TrainingInterrupted):
        train(
            open_shards([domains["source"]]),
            out,
            config,
            val=open_shards([domains["val"]]),
            pseudo_label=open_shards([domains["target"]]),
            on_step=on_step,
            on_message=messages.append,
        )
    _, meta = load_checkpoint(out)
    assert meta["train"]["adapt"]["round"] == 1 and meta["train"]["stopped"] == "interrupted"
    assert not meta["train"]["adapt"]["finalized"]
    round1 = tmp_path / "m.pt.pseudo" / "round-1" / "shard-00000.h5"
    before = os.stat(round1)
    assert any(m.startswith("round 1/2: kept") for m in messages)

    r = cli("train", "--resume", out)  # data, --val, --pseudo-label, threshold and rounds from the checkpoint
    assert r.exit_code == 0, r.stderr
    after = os.stat(round1)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # round 1's set reused
    assert "round 0" not in r.stderr and "round 1/2: kept" not in r.stderr  # neither redone
    assert "round 1/2: training from scratch on 96 + " in r.stderr and "(resuming)" in r.stderr
    assert "round 2/2: kept" in r.stderr
    epochs = [line for line in r.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2  # round 1's epoch (resumed mid-way), round 2's
    _, meta = load_checkpoint(out)
    adapt = meta["train"]["adapt"]
    assert adapt["round"] == 2 and adapt["finalized"] and [rec["round"] for rec in adapt["records"]] == [0, 1, 2]
    assert adapt["pseudo"]["threshold"] == 0.8
    finished = cli("train", "--resume", out)
    assert finished.exit_code == 2
    one_error_line(finished, "already finished (2 of 2 rounds)", "--rounds")
    # ... and ends with the weights of an uninterrupted run.
    reference = tmp_path / "reference.pt"
    train(
        open_shards([domains["source"]]),
        reference,
        config,
        val=open_shards([domains["val"]]),
        pseudo_label=open_shards([domains["target"]]),
    )
    ours, theirs = _torch_load(out, "cpu")["state_dict"], _torch_load(reference, "cpu")["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
