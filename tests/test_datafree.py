"""`fakecifar distill --method M`: data-free distillation end to end on CPU at toy scale -- a real
tiny teacher (.pt white-box, .onnx and `fakecifar serve` black-box), real generators and
students trained a few iterations, the ledger exact (and equal to the server's own count),
exact resume, and every bad input of the issue."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from teacher_server import CLASSES, SIZE

from fakecifar.checkpoint import _torch_load, load_checkpoint
from fakecifar.manifest import describe_directory
from fakecifar.shards import ShardWriter

from helpers import one_error_line, random_images, signalled_run

# Toy scale: 2 iterations per epoch of batch 8, a tiny generator.
TINY = ["--batch-size", "8", "--latent", "16", "--generator-width", "8", "--student-steps", "2"]
TINY += ["--steps-per-epoch", "2", "--precision", "fp32", "--seed", "0", "--epochs", "1"]
PER_STEP = {"dafl": 8 * 2, "zskt": 8 * 2, "dfad": 8 * 3, "dfme": 8 * 2 + 8 * 2, "dfms": 8 * 2}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("proxy")
    with ShardWriter(directory / "p.h5", classes=CLASSES, image_size=(SIZE, SIZE), producer="test") as w:
        w.add_batch(random_images(32, (SIZE, SIZE), 5), np.full(32, -1))
    describe_directory(directory)
    return directory


def queries_of(checkpoint: Path) -> dict:
    return load_checkpoint(checkpoint)[1]["train"]["queries"]


def teacher_for(method: str, models) -> Path:
    return models.pt if method in ("dafl", "zskt", "dfad") else models.onnx


@pytest.mark.parametrize("method", ["dafl", "zskt", "dfad", "dfme", "dfms"])
def test_each_method_runs_end_to_end_and_the_ledger_counts_every_query(cli, models, proxy, tmp_path, method):
    out = tmp_path / f"{method}.pt"
    student = "resnet20" if method == "zskt" else "lenet5"  # zskt: attention on the shared stages
    extra = ["--proxy", str(proxy)] if method == "dfms" else []
    result = cli(
        "distill",
        "--teacher",
        teacher_for(method, models),
        "--method",
        method,
        "--student",
        student,
        *TINY,
        *extra,
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out)]
    s = queries_of(out)
    assert s["queries"] == 2 * PER_STEP[method], s  # 2 iterations, each paid in full, counted where asked
    model, meta = load_checkpoint(out)
    assert meta["train"]["distill"]["method"] == method and meta["classes"] == CLASSES
    assert "generator" in _torch_load(out, "cpu")["resume"]["task"]
    assert "selection" in meta["train"] and "final" in meta["train"]["selection"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, SIZE, SIZE))).all()


def test_black_box_methods_against_fakecifar_serve_agree_with_the_servers_count(cli, real_serve, proxy, tmp_path):
    for method, mode, extra in [("dfme", "probs", []), ("dfms", "label", ["--proxy", str(proxy)])]:
        server = real_serve(mode=mode)
        out = tmp_path / f"{method}.pt"
        result = cli(
            "distill", "--teacher", server.url, "--method", method, "--student", "lenet5", *TINY, *extra, "-o", out
        )
        assert result.exit_code == 0, result.stderr
        s = queries_of(out)
        assert s["queries"] == 2 * PER_STEP[method] == server.accounts()["anonymous"]["images"]


def test_a_budget_sizes_the_run_and_is_never_exceeded(cli, models, tmp_path):
    out = tmp_path / "b.pt"
    # dfme at this scale: 32 queries a step; 100 queries over 1 epoch -> 3 steps (96 queries).
    result = cli(
        "distill",
        "--teacher",
        models.onnx,
        "--method",
        "dfme",
        "--student",
        "lenet5",
        *TINY,
        "--queries",
        "100",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert queries_of(out)["queries"] == 96
    assert "of 100" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_after_sigterm_or_kill_9_is_exact_and_pays_nothing_twice(cli, models, tmp_path, sig):
    args = ["distill", "--teacher", models.onnx, "--method", "dfme", "--student", "lenet5", *TINY]
    args += ["--epochs", "2", "--schedule", "constant", "--replay", "12"]  # the replay buffer resumes too
    straight, cut = tmp_path / "straight.pt", tmp_path / "cut.pt"
    assert cli(*args, "-o", straight).exit_code == 0
    stopped = signalled_run("fakecifar.training.datafree", (1, 1), [*args, "-o", cut], sig)
    assert stopped.returncode == (143 if sig == signal.SIGTERM else -9), stopped.stderr
    resumed = cli("distill", "--resume", cut)
    assert resumed.exit_code == 0, resumed.stderr
    a, b = load_checkpoint(straight)[0].state_dict(), load_checkpoint(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed gives the same student
    # Replayed iterations are answered from the ledger's cache: nothing is paid twice.
    assert queries_of(cut)["queries"] == queries_of(straight)["queries"] == 4 * PER_STEP["dfme"]


def test_resume_with_other_method_options_is_refused(cli, models, tmp_path):
    out = tmp_path / "r.pt"
    args = ["distill", "--teacher", models.onnx, "--method", "dfme", "--student", "lenet5", *TINY]
    assert cli(*args, "-o", out).exit_code == 0
    before = out.read_bytes()
    changed = cli("distill", "--resume", out, "--epochs", "2", "--directions", "4")
    assert changed.exit_code == 2
    one_error_line(changed, "--directions 1 (not 4)", command="distill")
    other_mode = cli("distill", "--resume", out, "--epochs", "2", "--mode", "probs:2")
    assert other_mode.exit_code == 2
    one_error_line(other_mode, "--mode logits (not probs:2)", command="distill")
    assert out.read_bytes() == before
    same_mode = cli("distill", "--resume", out, "--epochs", "2", "--mode", "logits", "--queries", "1000")
    assert same_mode.exit_code == 0, same_mode.stderr


def test_white_box_method_with_a_black_box_teacher_is_refused(cli, models, real_serve, tmp_path):
    for teacher in (models.onnx, real_serve(mode="probs").url):
        result = cli("distill", "--teacher", teacher, "--method", "dafl", *TINY, "-o", tmp_path / "w.pt")
        assert result.exit_code == 2
        one_error_line(result, "--method dafl is white-box", "--method dfme", command="distill", last=True)
    assert not (tmp_path / "w.pt").exists()


def test_label_only_teacher_for_dfme_is_refused(cli, models, tmp_path):
    result = cli(
        "distill", "--teacher", models.onnx, "--mode", "label", "--method", "dfme", *TINY, "-o", tmp_path / "l.pt"
    )
    assert result.exit_code == 2
    one_error_line(result, "dfme needs probabilities", "--method dfms", command="distill", last=True)


def test_a_budget_spent_before_the_first_generator_step_is_refused(cli, models, tmp_path):
    result = cli(
        "distill", "--teacher", models.onnx, "--method", "dfme", *TINY, "--queries", "20", "-o", tmp_path / "q.pt"
    )
    assert result.exit_code == 2
    one_error_line(
        result, "--queries 20 is spent before the first generator step", "32 images", command="distill", last=True
    )
    assert not (tmp_path / "q.pt").exists() and not (tmp_path / "q.pt.queries").exists()


def test_dfms_needs_a_proxy_and_data_free_takes_no_transfer_set(cli, models, proxy, tmp_path):
    none = cli("distill", "--teacher", models.onnx, "--method", "dfms", *TINY, "-o", tmp_path / "p.pt")
    assert none.exit_code == 2
    one_error_line(none, "--method dfms needs a proxy set", command="distill", last=True)
    both = cli(
        "distill", "--teacher", models.onnx, "--method", "dfme", "--transfer", proxy, *TINY, "-o", tmp_path / "p.pt"
    )
    assert both.exit_code == 2
    one_error_line(both, "--transfer is for --method transfer", command="distill")


def test_a_collapsing_generator_stops_the_run_and_writes_nothing_bad(cli, models, tmp_path):
    out = tmp_path / "c.pt"
    # An absurd generator learning rate makes its images, and then its loss, non-finite.
    args = ["distill", "--teacher", models.pt, "--method", "dfad", "--student", "lenet5", *TINY]
    result = cli(*args, "--epochs", "3", "--generator-lr", "1e20", "-o", out)
    assert result.exit_code == 1, result.stderr
    one_error_line(
        result,
        "generator loss became NaN/inf in epoch 1",
        "no checkpoint was written",
        "lower --generator-lr",
        command="distill",
        last=True,
    )
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_dynamic_student_learns_by_dfme_and_reports_its_gate_pattern(cli, models, tmp_path):
    out = tmp_path / "gated.pt"
    result = cli(
        "distill", "--teacher", models.onnx, "--method", "dfme", "--student", "gated-resnet20", *TINY, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("gates (execution rate per block")]
    assert len(line) == 1 and re.search(r": [x-]{3}\|[x-]{3}\|[x-]{3} \(mean rate", line[0]), result.stderr


def test_replay_buffer_keeps_the_last_images_and_round_trips():
    from fakecifar.training.datafree import ReplayBuffer

    buffer = ReplayBuffer(5)
    for start in (0, 3, 6):  # 9 images into 5 places: the last 5 (4..8) stay
        x = torch.arange(start, start + 3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2) / 10
        buffer.add(x, torch.arange(start, start + 3))
    assert buffer.targets is not None and len(buffer) == 5
    assert sorted(buffer.targets.tolist()) == [4, 5, 6, 7, 8]
    images, targets = buffer.sample(7)
    assert images.dtype == torch.float32 and torch.allclose(images[:, 0, 0, 0], targets.float() / 10, atol=1e-3)
    copy = ReplayBuffer(5)
    copy.load_state_dict(buffer.state_dict(), torch.device("cpu"))
    assert copy.images is not None and buffer.images is not None
    assert torch.equal(copy.images, buffer.images) and copy.next == buffer.next and len(copy) == 5


def test_a_budget_too_small_for_the_epochs_and_a_proxy_of_another_size_are_refused(cli, models, tmp_path):
    few = cli(
        "distill",
        "--teacher",
        models.onnx,
        "--method",
        "dfme",
        *TINY,
        "--epochs",
        "4",
        "--queries",
        "100",
        "-o",
        tmp_path / "f.pt",
    )
    assert few.exit_code == 2
    one_error_line(few, "pays for 3 iterations", "lower --epochs to 3", command="distill", last=True)
    big = tmp_path / "big"
    with ShardWriter(big / "p.h5", classes=CLASSES, image_size=(SIZE * 2, SIZE * 2), producer="test") as w:
        w.add_batch(random_images(4, (SIZE * 2, SIZE * 2), 1), np.full(4, -1))
    describe_directory(big)
    other = cli("distill", "--teacher", models.onnx, "--method", "dfms", "--proxy", big, *TINY, "-o", tmp_path / "o.pt")
    assert other.exit_code == 2
    one_error_line(other, "--proxy images are 32x32", "fakecifar resize --size 16x16", command="distill", last=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # nothing written: no ledger either


def test_resume_with_another_proxy_set_is_refused(cli, models, proxy, tmp_path):
    out = tmp_path / "p.pt"
    assert (
        cli("distill", "--teacher", models.onnx, "--method", "dfms", "--proxy", proxy, *TINY, "-o", out).exit_code == 0
    )
    other = tmp_path / "other"
    with ShardWriter(other / "p.h5", classes=CLASSES, image_size=(SIZE, SIZE), producer="test") as w:
        w.add_batch(random_images(8, (SIZE, SIZE), 9), np.full(8, -1))
    describe_directory(other)
    before = out.read_bytes()
    result = cli("distill", "--resume", out, "--epochs", "2", "--proxy", other)
    assert result.exit_code == 2
    one_error_line(result, "the run was started with --proxy", str(proxy), command="distill")
    assert out.read_bytes() == before
    again = cli("distill", "--resume", out, "--epochs", "2")  # the stored proxy set is used
    assert again.exit_code == 0, again.stderr


@pytest.mark.parametrize("method", ["dafl", "dfme"])
def test_under_torchrun_rank_0_meters_every_process_and_one_student_is_written(models, tmp_path, method):
    """Two processes on gloo: white-box (each runs its teacher, rank 0 charges both) and
    black-box (rank 0 asks for both processes' images in one call, replay shared): the ledger
    counts exactly what a single process would pay for the same --batch-size."""
    import os
    import subprocess
    import sys

    out, val = tmp_path / f"ddp-{method}.pt", tmp_path / "val"
    val.mkdir()
    with ShardWriter(val / "v.h5", classes=CLASSES, image_size=(SIZE, SIZE), producer="test") as w:
        w.add_batch(random_images(10, (SIZE, SIZE), 6), np.arange(10) % len(CLASSES))
    describe_directory(val)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = ["--replay", "32"] if method == "dfme" else []
    proc = subprocess.run(
        [*torchrun, "-m", "fakecifar", "distill", "--teacher", str(teacher_for(method, models))]
        + ["--method", method, "--student", "lenet5", *TINY, *extra, "--val", str(val), "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]  # one process speaks
    meta = load_checkpoint(out)[1]["train"]
    assert meta["world_size"] == 2
    assert meta["queries"]["queries"] == 2 * PER_STEP[method]
    assert proc.stderr.count("val_acc") == 1  # the epoch line once, over both processes' val slices


def test_bn_prior_is_zero_at_the_running_statistics_and_pulls_images_toward_them():
    from torch import nn

    from fakecifar.priors import BatchNormPrior

    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(64, 3, 4, 4) * 2 + 1
    assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False))
    prior = BatchNormPrior(nn.Sequential(bn))
    bn(x)
    assert prior.loss().item() == pytest.approx(0.0, abs=1e-5)
    y = torch.randn(64, 3, 4, 4, requires_grad=True)
    bn(y)
    loss = prior.loss()
    assert loss.item() > 0.5
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert prior.loss().item() == 0.0  # read once: the next forward starts afresh
    prior.remove()
    bn(x)
    assert prior.loss().item() == 0.0


def test_bn_prior_runs_with_white_box_methods_and_is_refused_for_black_box(cli, models, tmp_path):
    out = tmp_path / "bn.pt"
    result = cli(
        "distill",
        "--teacher",
        models.pt,
        "--method",
        "dfad",
        "--student",
        "lenet5",
        *TINY,
        "--bn-prior",
        "0.1",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    assert queries_of(out)["queries"] == 2 * PER_STEP["dfad"]  # the prior rides on the charged forwards
    assert load_checkpoint(out)[1]["train"]["distill"]["bn_prior"] == 0.1
    plain = tmp_path / "plain.pt"
    result = cli("distill", "--teacher", models.pt, "--method", "dfad", "--student", "lenet5", *TINY, "-o", plain)
    assert result.exit_code == 0, result.stderr
    with_prior = _torch_load(out, "cpu")["resume"]["task"]["generator"]
    without = _torch_load(plain, "cpu")["resume"]["task"]["generator"]
    assert any(not torch.equal(with_prior[k], without[k]) for k in without)  # the prior moved the generator
    refused = tmp_path / "no.pt"
    result = cli(
        "distill",
        "--teacher",
        models.onnx,
        "--method",
        "dfme",
        "--student",
        "lenet5",
        *TINY,
        "--bn-prior",
        "0.1",
        "-o",
        refused,
    )
    needles = ("--bn-prior needs the teacher's batch-norm statistics", "not dfme")
    one_error_line(result, *needles, command="distill", last=True)
    assert not refused.exists()
