"""`fakecifar train --adv pgd-l2`: adversarial training (Madry et al. 2018) end to end and then
attacked by `eval --attack`, the step's images inside the L2 ball, every refusal, exact resume
after a SIGTERM mid-epoch, and DDP (slow)."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from helpers import one_error_line as _one_error_line
from helpers import signalled_run

one_error_line = functools.partial(_one_error_line, command="train", last=True)

torch = pytest.importorskip("torch")

FAST = ["--model", "resnet20", "--batch-size", "8", "--precision", "fp32"]
ADV = ["--adv", "pgd-l2", "--adv-eps", "0.5", "--adv-steps", "2"]


@pytest.fixture
def data(make_shard):
    """24 8x8 images of 3 classes, with an origin column (half real, half fake)."""
    return make_shard("train.h5", n=24, origin=np.arange(24) % 2)


def _state(path):
    from fakecifar.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    return model.state_dict(), meta


def test_robust_origin_model_end_to_end(cli, data, tmp_path):
    """train --target origin --adv records the attack in the checkpoint's args (bf16 autocast: the
    attack itself runs in float32); eval --attack pgd-l2 then attacks the model it wrote."""
    out = tmp_path / "robust.pt"
    args = ["--model", "resnet20", "--batch-size", "8", "--precision", "bf16", "--target", "origin", *ADV]
    r = cli("train", data, *args, "--epochs", "2", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.lines == [str(out)]
    assert "adversarial pgd-l2 eps 0.5 x 2 steps" in r.stderr and "epoch 2/2" in r.stderr
    _, meta = _state(out)
    args_saved = meta["train"]["args"]
    assert (args_saved["adv"], args_saved["adv_eps"], args_saved["adv_steps"]) == ("pgd-l2", 0.5, 2)
    assert meta["classes"] == ["real", "fake"] and meta["train"]["epochs_done"] == 2
    assert all(np.isfinite(h["train_loss"]) for h in meta["train"]["history"])

    r = cli("eval", out, "--on", data, "--attack", "pgd-l2", "--eps", "0,0.5,1", "--steps", "2", "--json")
    assert r.exit_code == 0, r.stderr
    (result,) = r.json_lines()
    assert result["target"] == "origin" and set(result["robust"]) == {"0.0", "0.5", "1.0"}
    assert result["robust"]["0.0"] == result["top1"]
    assert all(0 <= v <= 1 for v in result["robust"].values())


def test_defaults_apply_with_adv_only():
    from fakecifar.attacks import ATTACKS
    from fakecifar.train import make_config
    from fakecifar.training.config import ADV_ATTACKS, ADV_EPS, ADV_STEPS

    assert set(ADV_ATTACKS) <= set(ATTACKS)
    config = make_config(adv="pgd-l2")
    assert (config.adv_eps, config.adv_steps) == (ADV_EPS, ADV_STEPS) == (0.5, 7)
    plain = make_config()
    assert (plain.adv, plain.adv_eps, plain.adv_steps) == (None, None, None)
    # resuming a run keeps its attack; a radius given again overrides it
    assert make_config(base=config.to_dict(), adv_eps=1.0).adv_eps == 1.0


def _recording_step(config, mean, std, x, y):
    """One ClassificationTask step on a fresh resnet20; returns (the images the training forward
    was given, the weights before the step in eval mode, the model after the step)."""
    from torch import nn

    from fakecifar.models import build_model
    from fakecifar.training.classification import ClassificationTask
    from fakecifar.training.task import StepContext

    torch.manual_seed(0)
    model = build_model("resnet20", 3)
    task = ClassificationTask(config, 3, mean=mean, std=std)
    task.setup(model, torch.device("cpu"))
    before = copy.deepcopy(model).eval()
    seen: list = []  # of tensors

    class Recorder(nn.Module):  # ctx.net: the training forward (DDP's wrapper in a real run)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            seen.append(images.detach().clone())
            return self.inner(images)

    model.train()
    out = task.step((x, {"labels": y}), StepContext(Recorder(model), model, torch.device("cpu")))
    assert np.isfinite(out.loss.item()) and out.count == len(x)
    return seen, before, model


def test_a_step_trains_on_images_perturbed_within_the_ball():
    import torch.nn.functional as F

    from fakecifar.train import make_config

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x01 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x, y = (x01 - m) / s, torch.arange(8) % 3
    eps = 0.5
    seen, before, model = _recording_step(make_config(adv="pgd-l2", adv_eps=eps, adv_steps=3), mean, std, x, y)
    assert len(seen) == 1  # the attack does not go through ctx.net: only the training forward does
    adv01 = seen[0] * s + m
    distance = (adv01 - x01).flatten(1).norm(dim=1)
    assert (distance <= eps + 1e-4).all() and (distance > eps / 2).all(), distance
    assert adv01.min() >= -1e-5 and adv01.max() <= 1 + 1e-5  # inside the [0, 1] box
    assert model.training  # the update ran in train mode, after the attack's eval mode
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after the attack
    with torch.no_grad():  # adversarial for the weights they were made against
        assert F.cross_entropy(before(seen[0]), y) > F.cross_entropy(before(x), y) + 0.01
    # without --adv the step trains on the batch itself; the attack is deterministic
    assert torch.equal(_recording_step(make_config(), mean, std, x, y)[0][0], x)
    again, _, _ = _recording_step(make_config(adv="pgd-l2", adv_eps=eps, adv_steps=3), mean, std, x, y)
    assert torch.equal(again[0], seen[0])


def test_the_task_refuses_soft_targets_set_after_validation():
    """distill turns a validated config into soft targets: the task checks again."""
    from fakecifar.errors import UsageError
    from fakecifar.train import make_config
    from fakecifar.training.classification import ClassificationTask

    config = make_config(adv="pgd-l2")
    with pytest.raises(UsageError, match="--adv pgd-l2 trains on hard labels"):
        ClassificationTask(replace(config, soft="kl"), 3, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ValueError, match="mean and std"):
        ClassificationTask(config, 3)


@pytest.mark.parametrize(
    "options, needles",
    [
        (["--adv", "fgsm"], ["unknown --adv 'fgsm'", "pgd-l2"]),
        (["--adv", "pgd-l2", "--adv-eps", "0"], ["--adv-eps must be a positive finite L2 radius, got 0.0"]),
        (["--adv", "pgd-l2", "--adv-eps", "-1"], ["--adv-eps", "got -1.0"]),
        (["--adv", "pgd-l2", "--adv-eps", "nan"], ["--adv-eps", "got nan"]),
        (["--adv", "pgd-l2", "--adv-eps", "inf"], ["--adv-eps", "got inf"]),
        (["--adv", "pgd-l2", "--adv-steps", "0"], ["--adv-steps must be at least 1, got 0"]),
        (["--adv-eps", "0.5"], ["--adv-eps needs --adv", "add --adv pgd-l2"]),
        (["--adv-steps", "3"], ["--adv-steps needs --adv", "add --adv pgd-l2"]),
        (["--adv-eps", "0.5", "--adv-steps", "3"], ["--adv-eps and --adv-steps need --adv"]),
        (["--adv", "pgd-l2", "--soft", "kl"], ["--adv pgd-l2 trains on hard labels", "--soft kl", "drop --soft"]),
    ],
)
def test_bad_adversarial_options_are_refused_before_any_data(cli, data, tmp_path, monkeypatch, options, needles):
    import fakecifar.shards

    def opened(*args, **kwargs):
        raise AssertionError("open_shards was called before the refusal")

    monkeypatch.setattr(fakecifar.shards, "open_shards", opened)
    out = tmp_path / "m.pt"
    r = cli("train", data, *FAST, "--epochs", "1", *options, "-o", out)
    assert r.exit_code == 2, r.stderr
    one_error_line(r, *needles)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_interrupted_adversarial_run_resumes_to_the_same_weights(cli, data, tmp_path):
    args = [data, *FAST, *ADV, "--batch-size", "4", "--epochs", "2", "--seed", "1"]  # 6 steps per epoch
    straight = tmp_path / "straight.pt"
    assert cli("train", *args, "-o", straight).exit_code == 0

    out = tmp_path / "m.pt"
    run = signalled_run("fakecifar.training.sources", (1, 2), ["train", *args, "-o", out], signal.SIGTERM)
    assert run.returncode == 143, run.stderr
    assert "terminated (SIGTERM) in epoch 2/2 after step 3/6" in run.stderr.strip().splitlines()[-1]
    _, meta = _state(out)
    assert meta["train"]["stopped"] == "interrupted" and meta["train"]["epochs_done"] == 1

    r = cli("train", "--resume", out)  # the attack comes back with the stored args
    assert r.exit_code == 0, r.stderr
    state, meta = _state(out)
    assert meta["train"]["args"]["adv"] == "pgd-l2" and meta["train"]["epochs_done"] == 2
    for key, value in _state(straight)[0].items():
        assert torch.equal(state[key], value), key


@pytest.mark.slow
def test_adversarial_training_under_ddp_on_cpu(data, tmp_path):
    """torchrun --nproc_per_node 2 on gloo: each process attacks its slice with the bare module."""
    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "fakecifar", "train", str(data), *FAST, *ADV, "--epochs", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    _, meta = _state(out)
    assert meta["train"]["world_size"] == 2 and meta["train"]["args"]["adv_steps"] == 2
    assert json.dumps(meta["train"]["history"])  # plain numbers
