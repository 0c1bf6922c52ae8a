"""`fakecifar train`: checkpoints, schedules, targets, soft targets, resume, early stopping, and
every refusal (unknown model, existing output, other arch on resume, NaN loss, Ctrl-C)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import CLASSES3, cli_in_fresh_process, random_images, signalled_run
from helpers import one_error_line as _one_error_line

one_error_line = functools.partial(_one_error_line, command="train", last=True)

torch = pytest.importorskip("torch")


@pytest.fixture
def data(make_shard):
    """24 8x8 images of 3 classes, with an origin column (half real, half fake)."""
    return make_shard("train.h5", n=24, origin=np.arange(24) % 2)


@pytest.fixture
def val(make_shard):
    return make_shard("val.h5", n=12, seed=7, origin=np.arange(12) % 2)


FAST = ["--model", "resnet20", "--batch-size", "8", "--precision", "fp32"]


def test_list_models(cli):
    result = cli("train", "--list-models")
    assert result.exit_code == 0, result.stderr
    names = [line.split()[0] for line in result.lines[2:]]
    assert "resnet20" in names and "lenet5" in names and "resnet56" in names
    assert "0.27M" in result.stdout


def test_train_writes_pt_and_onnx_and_logs(cli, data, tmp_path):
    from fakecifar.checkpoint import OnnxClassifier, load_checkpoint
    from fakecifar.shards import open_shards
    from fakecifar.stats import dataset_stats

    out = tmp_path / "m.pt"
    log = tmp_path / "log.jsonl"
    result = cli("train", data, *FAST, "--epochs", "2", "-o", out, "--onnx", "--log", log)
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out), str(tmp_path / "m.onnx")]
    assert "epoch 1/2" in result.stderr and "epoch 2/2" in result.stderr
    model, meta = load_checkpoint(out)
    stats = dataset_stats(open_shards([data]), "x")[0]
    assert meta["arch"] == "resnet20" and meta["classes"] == CLASSES3 and meta["input_size"] == [8, 8]
    assert np.allclose(meta["mean"], stats.mean) and np.allclose(meta["std"], stats.std)
    train = meta["train"]
    assert train["args"]["lr"] == 0.1 and train["args"]["nesterov"] is True and train["args"]["momentum"] == 0.9
    assert train["args"]["weight_decay"] == 5e-4 and train["args"]["batch_size"] == 8
    assert train["epochs_done"] == 2 and train["stopped"] == "completed" and len(train["history"]) == 2
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1 for r in records)
    # ONNX gives the same predictions as torch
    images = open_shards([data]).read("images")
    x01 = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    onnx_logits = OnnxClassifier(tmp_path / "m.onnx").predict_logits(x01)
    norm = (torch.from_numpy(x01) - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch_logits = model(norm).numpy()
    assert np.allclose(onnx_logits, torch_logits, atol=1e-4)
    assert not list(tmp_path.glob("*.partial"))


def test_modified_model_trains_exports_and_reloads(cli, data, tmp_path):
    from fakecifar.checkpoint import OnnxClassifier, load_checkpoint

    out = tmp_path / "m.pt"
    result = cli("train", data, *FAST, "--model", "resnet20+dct+highpass", "--epochs", "1", "--whiten", "-o", out,
                 "--onnx")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model, meta = load_checkpoint(out)
    assert meta["arch"] == "resnet20+highpass+dct"  # canonical order
    x01 = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch_logits = model((torch.from_numpy(x01) - mean) / std).numpy()
    assert np.allclose(OnnxClassifier(tmp_path / "m.onnx").predict_logits(x01), torch_logits, atol=1e-4)
    bad = cli("train", data, *FAST, "--model", "resnet20+sharpen", "-o", tmp_path / "n.pt")
    assert bad.exit_code == 2
    one_error_line(bad, "sharpen", "highpass")


def test_unknown_model_is_a_usage_error(cli, data, tmp_path):
    result = cli("train", data, "--model", "resnet21", "-o", tmp_path / "m.pt")
    assert result.exit_code == 2
    one_error_line(result, "unknown model 'resnet21'", "did you mean")
    assert not (tmp_path / "m.pt").exists()


def test_existing_output_is_refused_and_untouched(cli, data, tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    result = cli("train", data, *FAST, "--epochs", "1", "-o", out)
    assert result.exit_code == 2
    one_error_line(result, str(out), "--overwrite")
    assert out.read_bytes() == b"precious"
    onnx = tmp_path / "n.onnx"
    onnx.write_bytes(b"also precious")
    result = cli("train", data, *FAST, "--epochs", "1", "-o", tmp_path / "n.pt", "--onnx")
    assert result.exit_code == 2 and onnx.read_bytes() == b"also precious"
    assert not (tmp_path / "n.pt").exists()
    assert cli("train", data, *FAST, "--epochs", "1", "-o", out, "--overwrite").exit_code == 0


def test_bad_options_are_usage_errors(cli, data, make_shard, tmp_path):
    out = tmp_path / "m.pt"
    assert cli("train", data, *FAST, "-o", out, "--schedule", "sawtooth").exit_code == 2
    assert cli("train", data, *FAST, "-o", out, "--augment", "rotate").exit_code == 2
    assert cli("train", data, *FAST, "-o", out, "--soft", "kl").exit_code == 2  # no logits column
    no_origin = make_shard("plain.h5", n=6)
    r = cli("train", no_origin, *FAST, "-o", out, "--target", "origin")
    assert r.exit_code == 2
    one_error_line(r, "plain.h5", "origin")
    other = make_shard("other.h5", n=6, classes=["a", "b"])
    r = cli("train", data, *FAST, "-o", out, "--val", other)
    assert r.exit_code == 2 and "other.h5" in r.stderr
    assert cli("train", data, *FAST).exit_code == 2  # no -o
    assert not out.exists()


def test_schedules():
    from fakecifar.train import lr_factor, make_config

    total, per = 100, 10
    cos = make_config(schedule="cosine", epochs=10)
    assert lr_factor(cos, 0, total, per) == 1.0 and abs(lr_factor(cos, 50, total, per) - 0.5) < 1e-9
    assert lr_factor(cos, 100, total, per) == 0.0
    one = make_config(schedule="onecycle", epochs=10)
    assert abs(lr_factor(one, 0, total, per) - 0.1) < 1e-9 and abs(lr_factor(one, 25, total, per) - 1) < 1e-9
    assert lr_factor(one, 100, total, per) == 0.0
    ms = make_config(schedule="multistep", epochs=10, milestones=[0.5, 0.75])
    assert [round(lr_factor(ms, s, total, per), 6) for s in (0, 49, 50, 75, 99)] == [1, 1, 0.1, 0.01, 0.01]
    ms_epochs = make_config(schedule="multistep", epochs=10, milestones=[2, 8], gamma=0.5)
    assert [lr_factor(ms_epochs, s, total, per) for s in (19, 20, 80)] == [1, 0.5, 0.25]
    warm = make_config(schedule="cosine", epochs=10, warmup=1)
    assert lr_factor(warm, 0, total, per) == 0.1 and lr_factor(warm, 9, total, per) == 1.0


def test_recipes_are_defaults_that_options_override():
    from fakecifar.errors import UsageError
    from fakecifar.train import make_config

    fast = make_config("fast")
    assert fast.schedule == "onecycle" and fast.ema and fast.label_smoothing == 0.2 and fast.flip == "alternate"
    assert fast.whiten and fast.tta
    assert make_config("fast", epochs=3, model="lenet5").epochs == 3
    assert make_config(None, {"epochs": 7, "recipe": "fast"}).ema == fast.ema
    with pytest.raises(UsageError):
        make_config("turbo")


def test_fast_recipe_runs_with_ema_whitening_and_tta(cli, data, val, tmp_path):
    from fakecifar.checkpoint import load_checkpoint

    out = tmp_path / "fast.pt"
    result = cli("train", data, "--recipe", "fast", "--epochs", "2", "--batch-size", "8", "--val", val, "-o", out)
    assert result.exit_code == 0, result.stderr
    _, meta = load_checkpoint(out)
    args = meta["train"]["args"]
    assert args["recipe"] == "fast" and args["ema"] == 0.98 and args["epochs"] == 2
    assert all(np.isfinite(r["val_loss"]) for r in meta["train"]["history"])


def test_targets_origin_and_origin_class(cli, data, val, tmp_path):
    from fakecifar.checkpoint import load_checkpoint

    r = cli("train", data, *FAST, "--epochs", "1", "--target", "origin", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(tmp_path / "o.pt")[1]["classes"] == ["real", "fake"]
    r = cli("train", data, *FAST, "--epochs", "1", "--target", "origin+class", "--val", val, "-o", tmp_path / "oc.pt")
    assert r.exit_code == 0, r.stderr
    classes = load_checkpoint(tmp_path / "oc.pt")[1]["classes"]
    assert classes == [f"{o}/{c}" for o in ("real", "fake") for c in CLASSES3]
    # eval picks the target from the model's classes
    ev = cli("eval", tmp_path / "o.pt", tmp_path / "oc.pt", "--on", val, "--json")
    assert ev.exit_code == 0, ev.stderr
    assert [j["target"] for j in ev.json_lines()] == ["origin", "origin+class"]


def test_soft_targets_kl_and_l2(cli, make_shard, tmp_path):
    from fakecifar.checkpoint import load_checkpoint

    logits = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32) * 3
    soft = make_shard("soft.h5", n=16, logits=logits)
    for kind in ("kl", "l2"):
        out = tmp_path / f"{kind}.pt"
        r = cli("train", soft, *FAST, "--epochs", "1", "--soft", kind, "-T", "2", "-o", out)
        assert r.exit_code == 0, r.stderr
        hist = load_checkpoint(out)[1]["train"]["history"]
        assert np.isfinite(hist[0]["train_loss"])
    wrong = make_shard("wrong.h5", n=8, logits=np.zeros((8, 5), np.float32))
    r = cli("train", wrong, *FAST, "--soft", "kl", "-o", tmp_path / "w.pt")
    assert r.exit_code == 2 and "5 columns for 3 classes" in r.stderr


def test_soft_loss_values():
    from fakecifar.train import soft_loss

    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert soft_loss("kl", a, a.clone(), 4.0).abs().item() < 1e-6
    assert soft_loss("kl", a, a.flip(1), 4.0).item() > 0
    assert abs(soft_loss("l2", a, a + 1, 1.0).item() - 1.0) < 1e-6


def _state(path):
    from fakecifar.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    return model.state_dict(), meta


def test_resume_continues_exactly(cli, data, tmp_path):
    args = [data, *FAST, "--schedule", "constant", "--seed", "3"]
    straight = tmp_path / "straight.pt"
    assert cli("train", *args, "--epochs", "3", "-o", straight).exit_code == 0
    part = tmp_path / "part.pt"
    assert cli("train", *args, "--epochs", "1", "-o", part, "--log", tmp_path / "log.jsonl").exit_code == 0
    finished = cli("train", data, "--resume", part)  # nothing left to do
    assert finished.exit_code == 2 and "--epochs" in finished.stderr
    r = cli("train", "--resume", part, "--epochs", "3", "--log", tmp_path / "log.jsonl")  # data from the checkpoint
    assert r.exit_code == 0, r.stderr
    assert r.lines == [str(part)]
    a, meta_a = _state(straight)
    b, meta_b = _state(part)
    assert meta_b["train"]["epochs_done"] == 3 and len(meta_b["train"]["history"]) == 3
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_keeps_validating_on_the_stored_val_data(cli, data, val, tmp_path):
    out = tmp_path / "m.pt"
    assert cli("train", data, *FAST, "--epochs", "1", "--val", val, "-o", out).exit_code == 0
    r = cli("train", "--resume", out, "--epochs", "3")
    assert r.exit_code == 0, r.stderr
    _, meta = _state(out)
    assert all("val_loss" in h for h in meta["train"]["history"]) and len(meta["train"]["history"]) == 3
    assert meta["train"]["best_epoch"] is not None


def test_resume_from_another_architecture_is_refused(cli, data, tmp_path):
    part = tmp_path / "part.pt"
    assert cli("train", data, *FAST, "--epochs", "1", "-o", part).exit_code == 0
    before = part.read_bytes()
    r = cli("train", data, "--resume", part, "--model", "lenet5", "--epochs", "2")
    assert r.exit_code == 2
    one_error_line(r, str(part), "resnet20", "lenet5")
    assert part.read_bytes() == before


def test_resume_from_a_code_pickle_is_refused_and_not_run(cli, data, tmp_path, monkeypatch):
    import io

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "fakecifar-checkpoint", "resume": Payload()}, buffer)
    evil.write_bytes(buffer.getvalue())
    r = cli("train", data, "--resume", evil, "--epochs", "2")
    assert r.exit_code == 2
    one_error_line(r, "evil.pt", "refused")
    assert not (tmp_path / "pwned").exists()
    assert evil.read_bytes() == buffer.getvalue()


def test_resume_needs_training_state(cli, data, tmp_path):
    from fakecifar.checkpoint import save_checkpoint
    from fakecifar.models import build_model

    bare = tmp_path / "bare.pt"
    save_checkpoint(
        bare,
        build_model("resnet20", 3),
        arch="resnet20",
        classes=CLASSES3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        input_size=8,
    )
    r = cli("train", data, "--resume", bare, "--model", "resnet20", "--epochs", "2")
    assert r.exit_code == 2
    one_error_line(r, "bare.pt", "no training state")


def test_early_stopping_keeps_the_best_weights(cli, data, val, tmp_path, monkeypatch):
    import fakecifar.training.classification as tr

    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    seen = []

    def scripted(model, loader, config, num_classes, amp, device, dist):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses), 0.5

    monkeypatch.setattr(tr, "_validate", scripted)
    out = tmp_path / "m.pt"
    r = cli("train", data, *FAST, "--epochs", "6", "--val", val, "--patience", "2", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "stopped early after epoch 4" in r.stderr and "epoch 2 (best val loss)" in r.stderr
    state, meta = _state(out)
    assert meta["train"]["best_epoch"] == 2 and meta["train"]["epochs_done"] == 4
    assert meta["train"]["stopped"] == "early-stop"
    for key, value in seen[1].items():  # the weights validated in epoch 2
        assert torch.equal(state[key], value), key
    assert not torch.equal(state["linear.weight"], seen[3]["linear.weight"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cli, data, tmp_path, monkeypatch):
    import fakecifar.training.classification as tr

    real = tr.hard_loss
    calls = {"n": 0}

    def poisoned(logits, targets, smoothing):
        calls["n"] += 1
        loss = real(logits, targets, smoothing)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(tr, "hard_loss", poisoned)
    out = tmp_path / "m.pt"
    r = cli(
        "train", data, "--model", "resnet20", "--batch-size", "12", "--precision", "fp32", "--epochs", "5", "-o", out
    )  # 2 steps per epoch: NaN in epoch 2
    assert r.exit_code == 1
    one_error_line(r, "NaN", "epoch 2", str(out), "epoch 1")
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1
    assert not list(tmp_path.glob("*.partial"))


def test_ctrl_c_saves_state_and_resume_continues(cli, data, tmp_path):
    out = tmp_path / "m.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fakecifar",
            "train",
            str(data),
            *FAST,
            "--batch-size",
            "4",
            "--epochs",
            "1000",
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("epoch 2/") or not line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(lines) + stderr
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    # mid-epoch, or at an epoch boundary when the signal lands during the validation or the save
    assert re.match(r"fakecifar train: error: interrupted (in|after) epoch \d+/1000", last), last
    assert f"--resume {out}" in last and str(out) in last
    assert stdout == ""
    _, meta = _state(out)
    assert meta["train"]["stopped"] == "interrupted"
    done = meta["train"]["epochs_done"]
    r = cli("train", data, "--resume", out, "--epochs", str(done + 2))
    assert r.exit_code == 0, r.stderr
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == done + 2 and meta["train"]["stopped"] == "completed"


def test_ddp_two_processes_on_cpu(data, tmp_path):
    """torchrun --nproc_per_node 2 on gloo: one checkpoint, paths printed once, same as 1 process."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "fakecifar", "train", str(data), *FAST, "--epochs", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    _, meta = _state(out)
    assert meta["train"]["world_size"] == 2 and meta["train"]["epochs_done"] == 2
    assert meta["train"]["images"] == 24


def test_augment_crop_and_flips():
    from fakecifar.augment import alternating_flip, image_coins, pad_crop, parse_augment, random_flip

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = pad_crop(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):  # each output is one window of the padded image
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 6, dx : dx + 6], out[i])
        ]
        assert hits
    assert torch.equal(pad_crop(x, 0, gen), x)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert pad_crop(cl, 2, gen).is_contiguous(memory_format=torch.channels_last)
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    imgs = torch.rand(64, 3, 4, 4)
    coins = image_coins(imgs)
    assert 10 < int(coins.sum()) < 54  # about half
    e0, e1 = alternating_flip(imgs, 0), alternating_flip(imgs, 1)
    for i in range(64):  # every image shown both ways over two epochs
        assert {bool(torch.equal(e0[i], imgs[i])), bool(torch.equal(e1[i], imgs[i]))} == {True, False}
    assert torch.equal(alternating_flip(imgs, 2), e0)
    assert parse_augment("flip,crop") == ("crop", "flip") and parse_augment("none") == ()


def _smooth_images(n: int = 32, size: int = 16):
    """Normalized images (mean 0.5, std 0.5) with both smooth content and pixel noise."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, size)
    base = (ramp.view(1, 1, -1, 1) * ramp.view(1, 1, 1, -1)).expand(n, 3, size, size)
    pixels = (0.8 * base + 0.2 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)
    return (pixels - 0.5) / 0.5


def _high_frequency(x):
    """Per-image energy of the differences between neighbouring pixels."""
    return (x[..., 1:] - x[..., :-1]).pow(2).mean((1, 2, 3))


def test_degrading_augmentations_take_a_seeded_half_and_remove_high_frequencies():
    from fakecifar.augment import augment_batch, parse_augment, step_generator

    x = _smooth_images()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
    for name in ("blur", "resize", "jpeg"):
        out = augment_batch(x, (name,), generator=step_generator(0, 0, 0), mean=mean, std=std)
        again = augment_batch(x, (name,), generator=step_generator(0, 0, 0), mean=mean, std=std)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, again)  # seeded
        changed = (out - x).abs().flatten(1).amax(1) > 1e-4
        assert 6 <= int(changed.sum()) <= 26, name  # about half of 32
        assert torch.equal(out[~changed], x[~changed])  # the others untouched
        assert (_high_frequency(out[changed]) < _high_frequency(x[changed])).all(), name
        assert (out - x)[changed].abs().mean() < 0.5  # degraded, not destroyed
    with pytest.raises(ValueError, match="mean and std"):
        augment_batch(x, ("jpeg",), generator=step_generator(0, 0, 0))
    # alternating flips keep their per-image phase from the stored pixels, degraded or not
    from fakecifar.augment import image_coins

    coins = image_coins(x)
    for epoch in (0, 1, 2):
        out = augment_batch(x, ("flip", "blur"), generator=step_generator(0, epoch, 0), epoch=epoch)
        plain = augment_batch(x, ("blur",), generator=step_generator(0, epoch, 0))
        flipped = coins ^ bool(epoch % 2)
        assert torch.equal(out[flipped], plain[flipped].flip(-1)) and torch.equal(out[~flipped], plain[~flipped])
    assert parse_augment("blur,crop,jpeg") == ("crop", "jpeg", "blur")
    with pytest.raises(Exception, match="crop,flip,jpeg,resize,blur"):
        parse_augment("sharpen")


def test_train_with_degrading_augmentations(cli, data, tmp_path):
    out = tmp_path / "m.pt"
    r = cli("train", data, *FAST, "--epochs", "1", "--augment", "crop,flip,jpeg,resize,blur", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert _state(out)[1]["train"]["args"]["augment"] == ["crop", "flip", "jpeg", "resize", "blur"]


def test_whitening_init_whitens_patches():
    from fakecifar.models import build_model
    from fakecifar.train import whiten_init

    torch.manual_seed(0)
    base = torch.rand(256, 3, 8, 8)
    images = base + 0.5 * base.roll(1, dims=1)  # correlated channels
    model = build_model("resnet20", 3)
    assert whiten_init(model, images)
    conv = model.conv1
    assert isinstance(conv, torch.nn.Conv2d)
    w = conv.weight.detach()
    assert torch.allclose(w[:8], -w[8:16])
    # the filters decorrelate: their responses on the patches have ~diagonal covariance
    resp = torch.nn.functional.conv2d(images, w[:8]).permute(0, 2, 3, 1).reshape(-1, 8)
    cov = resp.T @ resp / len(resp)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.05 * torch.diag(cov).max()


def test_train_and_eval_help_do_not_import_torch():
    for cmd in ("train", "eval", "confusion"):
        run = cli_in_fresh_process(cmd, "--help")
        assert run.exit_code == 0 and run.imported == [], run.stderr


def test_train_reads_shards_from_stdin(cli, data, tmp_path):
    r = cli("train", *FAST, "--epochs", "1", "-o", tmp_path / "m.pt", stdin=f"{data}\n")
    assert r.exit_code == 0, r.stderr
    assert r.lines == [str(tmp_path / "m.pt")]


def test_images_are_used_at_their_size(cli, make_shard, tmp_path):
    from fakecifar.checkpoint import load_checkpoint

    big = make_shard("big.h5", n=6, images=random_images(6, (16, 12)))
    r = cli("train", big, *FAST, "--epochs", "1", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(tmp_path / "m.pt")[1]["input_size"] == [16, 12]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_and_data_rebuild_the_same_onnx_bytes(cli, data, val, tmp_path, precision):
    """`make detector` promises a bit-for-bit rebuild: same seed and data, same exported model."""
    import hashlib

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run / "model.pt"
        out.parent.mkdir()
        r = cli(
            "train",
            data,
            "--val",
            val,
            *FAST,
            "--precision",
            precision,
            "--target",
            "origin",
            "--epochs",
            "2",
            "--ema",
            "0.9",
            "--whiten",
            "--seed",
            "5",
            "--onnx",
            "-o",
            out,
        )
        assert r.exit_code == 0, r.stderr
        digests.append(hashlib.sha256(out.with_suffix(".onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert "(2 classes, target origin)" in r.stderr


# ----------------------------------------------------------------------------- faults: full disks,
# SIGTERM, refusals before any data is read


@pytest.fixture
def data32(make_shard):
    """24 32x32 images for lenet5 (its checkpoint, ~0.75 MB, fits a 2 MiB tmpfs twice over)."""
    return make_shard("train32.h5", n=24, size=(32, 32))


LENET = ["--model", "lenet5", "--batch-size", "8", "--precision", "fp32"]


def _no_partials(*directories):
    left = [p for d in directories for p in d.rglob("*.partial")]
    assert not left, left


def _sizes(cli, data, tmp_path) -> tuple[int, int]:
    """Bytes of a 1-epoch lenet5 checkpoint and of its ONNX export on this data."""
    probe = tmp_path / "sizes" / "m.pt"
    assert cli("train", data, *LENET, "--epochs", "1", "-o", probe, "--onnx").exit_code == 0
    return probe.stat().st_size, probe.with_suffix(".onnx").stat().st_size


def test_full_disk_keeps_the_last_checkpoint(cli, data32, tmp_path, full_disk_dir, fill_disk):
    """A real ENOSPC on the second save (torch reports it as RuntimeError 'unexpected pos'): one
    line, exit 1, no .partial, and the epoch-1 checkpoint still loads."""
    pt_size, _ = _sizes(cli, data32, tmp_path)
    fill_disk(full_disk_dir, leave=pt_size + pt_size // 2)  # room for one checkpoint, not two
    out, log_file = full_disk_dir / "m.pt", tmp_path / "log.jsonl"
    r = cli("train", data32, *LENET, "--epochs", "3", "-o", out, "--log", log_file)
    assert r.exit_code == 1, r.stderr
    one_error_line(r, f"no space left on device writing {out} (free space or choose another -o)")
    assert "internal error" not in r.stderr and r.stdout == ""
    _no_partials(full_disk_dir, tmp_path)
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1 and meta["train"]["stopped"] == "running"
    assert [json.loads(line)["epoch"] for line in log_file.read_text().splitlines()] == [1]


def test_full_disk_on_the_onnx_export_keeps_the_checkpoint(cli, data32, tmp_path, full_disk_dir, fill_disk):
    pt_size, onnx_size = _sizes(cli, data32, tmp_path)
    fill_disk(full_disk_dir, leave=pt_size + onnx_size // 2 + 8192)
    out = full_disk_dir / "m.pt"
    r = cli("train", data32, *LENET, "--epochs", "1", "-o", out, "--onnx")
    assert r.exit_code == 1, r.stderr
    one_error_line(r, f"no space left on device writing {out.with_suffix('.onnx')} (free space")
    _no_partials(full_disk_dir)
    assert not out.with_suffix(".onnx").exists()
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1 and meta["train"]["stopped"] == "completed"


def test_full_disk_on_the_log_keeps_the_checkpoint_and_whole_lines(cli, data32, tmp_path, full_disk_dir, fill_disk):
    log_file = full_disk_dir / "log.jsonl"
    fill_disk(full_disk_dir, leave=0)
    out = tmp_path / "m.pt"
    r = cli("train", data32, *LENET, "--epochs", "2", "-o", out, "--log", log_file)
    assert r.exit_code == 1, r.stderr
    one_error_line(r, f"no space left on device writing {log_file}")
    assert log_file.read_bytes() == b""  # never half a line
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1


class _DiskFull:
    """A file whose writes fail with ENOSPC once `budget` bytes are written (like a full disk)."""

    def __init__(self, fh, budget: int):
        self._fh, self._budget = fh, budget

    def write(self, data):
        if len(data) > self._budget:
            self._fh.write(data[: self._budget])
            self._budget = 0
            raise OSError(28, os.strerror(28))  # ENOSPC
        self._budget -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _inject_enospc(monkeypatch, module, suffix: str, skip: int = 0, budget: int = 1000) -> None:
    """Make `module`'s writes to files named *suffix fail with ENOSPC after `skip` good opens."""
    import builtins

    opens = {"n": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - the wrapper closes it
        if str(file).endswith(suffix) and any(m in mode for m in "wa"):
            opens["n"] += 1
            if opens["n"] > skip:
                return _DiskFull(fh, budget)
        return fh

    monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize("where", ["checkpoint", "onnx", "log"])
def test_injected_enospc_is_one_line_and_keeps_earlier_files(cli, data, tmp_path, monkeypatch, where):
    """The same faults without a mount: OSError(ENOSPC) from the file's write."""
    import fakecifar.outputs
    import fakecifar.training.callbacks

    out, log_file = tmp_path / "m.pt", tmp_path / "log.jsonl"
    if where == "checkpoint":  # the epoch-2 save fails inside torch.save
        _inject_enospc(monkeypatch, fakecifar.outputs, ".pt.partial", skip=1)
        failed = out
    elif where == "onnx":
        _inject_enospc(monkeypatch, fakecifar.outputs, ".onnx.partial")
        failed = out.with_suffix(".onnx")
    else:  # the first line of the log (the creation of the empty log succeeds: it writes nothing)
        _inject_enospc(monkeypatch, fakecifar.training.callbacks, ".jsonl", budget=0)
        failed = log_file
    r = cli(
        "train", data, *FAST, "--epochs", "2" if where == "checkpoint" else "1", "-o", out, "--onnx", "--log", log_file
    )
    assert r.exit_code == 1, r.stderr
    one_error_line(r, f"no space left on device writing {failed} (free space or choose another -o)")
    _no_partials(tmp_path)
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1
    assert not out.with_suffix(".onnx").exists()
    lines = log_file.read_text().splitlines()
    assert len(lines) == (0 if where == "log" else 1) and all(json.loads(line) for line in lines)


def test_sigterm_saves_mid_epoch_and_the_resumed_epoch_logs_the_whole_epoch(cli, data, tmp_path):
    args = [data, *FAST, "--batch-size", "4", "--epochs", "2", "--seed", "1"]  # 6 steps per epoch
    straight, straight_log = tmp_path / "straight.pt", tmp_path / "straight.jsonl"
    assert cli("train", *args, "-o", straight, "--log", straight_log).exit_code == 0

    out, log_file = tmp_path / "m.pt", tmp_path / "m.jsonl"
    run = signalled_run(
        "fakecifar.training.sources", (1, 2), ["train", *args, "-o", out, "--log", log_file], signal.SIGTERM
    )
    stdout, stderr = run.stdout, run.stderr
    assert run.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"fakecifar train: error: terminated (SIGTERM) in epoch 2/2 after step 3/6; state saved to {out} "
        f"(continue with: fakecifar train --resume {out})"
    ), stderr
    assert stdout == ""
    _, meta = _state(out)
    assert meta["train"]["stopped"] == "interrupted" and meta["train"]["epochs_done"] == 1

    r = cli("train", "--resume", out, "--log", log_file)
    assert r.exit_code == 0, r.stderr
    ours = [json.loads(line) for line in log_file.read_text().splitlines()]
    theirs = [json.loads(line) for line in straight_log.read_text().splitlines()]
    assert [x["epoch"] for x in ours] == [1, 2]
    for key in ("train_loss", "train_acc", "lr"):  # the whole epoch 2, not its last 3 steps
        assert ours[1][key] == theirs[1][key], (key, ours[1], theirs[1])
    state, meta = _state(out)
    assert meta["train"]["history"][1]["train_loss"] == theirs[1]["train_loss"]
    for key, value in _state(straight)[0].items():
        assert torch.equal(state[key], value), key


def test_stop_flag_remembers_the_signal_and_a_second_one_stops_at_once():
    from fakecifar.errors import Terminated
    from fakecifar.train import _StopFlag

    with _StopFlag() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handler
        stop._handler(signal.SIGTERM, None)
        assert stop.set and stop.signum == signal.SIGTERM
        error = stop.interrupted("in epoch 1/2 after step 1/3", "m.pt")
        assert error.exit_code == 143 and "--resume m.pt" in str(error)
        with pytest.raises(Terminated):
            stop._handler(signal.SIGTERM, None)
    with _StopFlag() as stop:
        stop._handler(signal.SIGINT, None)
        assert stop.interrupted("x", "m.pt").exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            stop._handler(signal.SIGINT, None)


@pytest.fixture
def no_data_read(monkeypatch, tmp_path):
    """A dataset path that is not a shard, and open_shards made to fail loudly: a refusal that
    comes before any data is read says what is wrong with the output, not with the data."""
    import fakecifar.shards

    def opened(*args, **kwargs):
        raise AssertionError("open_shards was called before the refusal")

    monkeypatch.setattr(fakecifar.shards, "open_shards", opened)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not a shard")
    return garbage


def test_unwritable_and_too_long_outputs_are_refused_before_any_data(cli, tmp_path, no_data_read):
    garbage = no_data_read
    before = sorted(tmp_path.rglob("*"))
    cases = [
        (["-o", "/sys/m.pt"], ["cannot write /sys/m.pt"]),  # root may: os.access says yes, the probe says no
        (["-o", "/sys/new/dir/m.pt"], ["cannot write /sys/new/dir/m.pt"]),
        (["-o", tmp_path / "m.pt", "--log", "/sys/log.jsonl"], ["/sys/log.jsonl"]),
        (["-o", tmp_path / ("a" * 300 + ".pt")], ["file name too long", "303 bytes"]),
        (["-o", tmp_path / ("b" * 250 + ".pt")], ["file name too long", ".partial"]),  # fits; its .partial not
        (["-o", tmp_path / "c.pt", "--onnx", "--log", tmp_path / ("d" * 256)], ["--log", "file name too long"]),
        (["-o", tmp_path.joinpath(*["e" * 200] * 25, "m.pt")], ["path too long"]),
        (["-o", tmp_path], ["is a directory"]),
        (["-o", garbage / "m.pt"], [f"{garbage} is not a directory"]),
    ]
    for extra, needles in cases:
        r = cli("train", garbage, *FAST, *extra)
        assert r.exit_code == 2, (extra, r.stderr)
        one_error_line(r, *needles)
    assert sorted(tmp_path.rglob("*")) == before  # no probe file, no directory left behind


def test_existing_output_and_other_arch_on_resume_are_refused_before_any_data(cli, data, tmp_path, monkeypatch):
    part = tmp_path / "part.pt"
    assert cli("train", data, *FAST, "--epochs", "1", "-o", part).exit_code == 0
    saved = part.read_bytes()
    import fakecifar.shards

    monkeypatch.setattr(fakecifar.shards, "open_shards", lambda *a, **k: pytest.fail("data opened"))
    r = cli("train", data, *FAST, "--epochs", "1", "-o", part)
    assert r.exit_code == 2
    one_error_line(r, f"{part} already exists", "--overwrite")
    r = cli("train", data, "--resume", part, "--model", "lenet5", "--epochs", "2")
    assert r.exit_code == 2
    one_error_line(r, str(part), "resnet20", "lenet5")
    assert part.read_bytes() == saved


def test_read_only_filesystem_is_refused_before_any_data(cli, tmpfs_dir, no_data_read):
    ro = tmpfs_dir("1m", readonly=True)
    r = cli("train", no_data_read, *FAST, "-o", ro / "m.pt")
    assert r.exit_code == 2
    one_error_line(r, f"cannot write {ro / 'm.pt'}", "Read-only file system")


def test_sigterm_during_validation_stops_at_the_epoch_boundary(cli, data, val, tmp_path, monkeypatch):
    import fakecifar.training.classification as tr

    real = tr._validate
    calls = {"n": 0}

    def validate_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGTERM)  # lands on the training loop's handler
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "_validate", validate_then_sigterm)
    out = tmp_path / "m.pt"
    r = cli("train", data, *FAST, "--epochs", "3", "--val", val, "-o", out)
    assert r.exit_code == 143, r.stderr
    one_error_line(r, "terminated (SIGTERM) after epoch 1/3", f"--resume {out}")
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 1 and meta["train"]["stopped"] == "interrupted"
    r = cli("train", "--resume", out)
    assert r.exit_code == 0, r.stderr
    _, meta = _state(out)
    assert meta["train"]["epochs_done"] == 3 and len(meta["train"]["history"]) == 3
