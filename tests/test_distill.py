"""`fakecifar distill` end to end: a real tiny teacher (local .pt, .onnx, and behind the real
`fakecifar serve`), a real transfer set, real students trained a few steps; the query ledger
agrees with the server's own count; kill -9 and re-run pays for nothing twice; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from teacher_server import CLASSES, SIZE

from fakecifar.manifest import describe_directory
from fakecifar.shards import ShardWriter, open_shards

from helpers import one_error_line, random_images

STUDENT = ["--student", "lenet5", "--epochs", "2", "--batch-size", "16", "--precision", "fp32", "--seed", "0"]


def write_set(directory: Path, n: int, seed: int, classes: list[str] = CLASSES, size: int = SIZE) -> Path:
    images = random_images(n, (size, size), seed)
    with ShardWriter(directory / "s.h5", classes=classes, image_size=(size, size), producer="test") as w:
        w.add_batch(images, np.arange(n) % len(classes))
    describe_directory(directory)
    return directory


@pytest.fixture(scope="module")
def transfer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_set(tmp_path_factory.mktemp("transfer"), 48, seed=3)


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_set(tmp_path_factory.mktemp("val"), 20, seed=4)


def queries_of(checkpoint: Path) -> dict:
    from fakecifar.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)[1]["train"]["queries"]


def test_offline_distillation_labels_once_trains_and_reports(cli, models, transfer, val, tmp_path):
    out = tmp_path / "student.pt"
    result = cli("distill", "--teacher", models.pt, "--transfer", transfer, "--val", val, *STUDENT, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out)]
    assert "queries: 68: 68 unique" in result.stderr  # 48 transfer images + 20 for agreement on --val
    assert "agreement with the teacher" in result.stderr
    ledger = queries_of(out)
    assert ledger["queries"] == 48 and ledger["unique"] == 48  # the checkpoint's copy: as of the last save
    labelled = open_shards([Path(str(out) + ".transfer")])
    assert len(labelled) == 48 and {"logits", "teacher_labels", "labels"} <= set(labelled.columns)
    # The labelled set holds the teacher's answers: its top-1 is the stored teacher label.
    assert np.array_equal(labelled.read("logits").argmax(1), labelled.read("teacher_labels"))
    # A re-run with the same arguments (after --overwrite of the student) pays nothing again.
    again = cli(
        "distill", "--teacher", models.pt, "--transfer", transfer, "--val", val, *STUDENT, "-o", out, "--overwrite"
    )
    assert again.exit_code == 0, again.stderr
    assert "queries: 68: 68 unique; 68 answered from the cache" in again.stderr


def test_online_distillation_counts_every_augmented_view_and_stops_at_the_budget(cli, models, transfer, tmp_path):
    out = tmp_path / "online.pt"
    result = cli(
        "distill", "--teacher", models.onnx, "--transfer", transfer, "--online", "--queries", "60", *STUDENT, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    assert "the query budget is spent" in result.stderr
    s = queries_of(out)
    assert s["queries"] <= 60 and s["queries"] + s["cache_hits"] >= 48  # 3 batches of 16 views, then no room
    resumed = cli("distill", "--resume", out, "--queries", "200")
    assert resumed.exit_code == 0, resumed.stderr
    assert queries_of(out)["queries"] <= 200 and "budget is spent" not in resumed.stderr


def test_online_mixing_asks_about_each_blend_and_offline_mixing_is_refused(cli, models, transfer, tmp_path):
    out = tmp_path / "mixed.pt"
    result = cli(
        "distill", "--teacher", models.onnx, "--transfer", transfer, "--online", "--mix", "cutmix", *STUDENT, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    s = queries_of(out)
    assert s["queries"] + s["cache_hits"] == 2 * 48  # 2 epochs of 48 blends: one query each
    offline = cli(
        "distill",
        "--teacher",
        models.onnx,
        "--transfer",
        transfer,
        "--mix",
        "mixup",
        *STUDENT,
        "-o",
        tmp_path / "no.pt",
    )
    assert offline.exit_code == 2
    one_error_line(offline, "--mix mixup needs --online", command="distill")
    assert not (tmp_path / "no.pt").exists()


def test_mix_batch_is_seeded_convex_and_reports_what_each_image_keeps():
    import torch

    from fakecifar.augment import step_generator
    from fakecifar.training.mixing import mix_batch, mixed_labels

    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    mixed, perm, kept = mix_batch(x, "mixup", step_generator(0, 0, 5))
    again, _, _ = mix_batch(x, "mixup", step_generator(0, 0, 5))
    assert torch.equal(mixed, again)  # the same (seed, step): the same blend (exact resume)
    expected = kept.view(-1, 1, 1, 1) * x + (1 - kept.view(-1, 1, 1, 1)) * x[perm]
    assert torch.allclose(mixed, expected)
    cut, perm, kept = mix_batch(x, "cutmix", step_generator(0, 0, 6))
    own = (cut == x).flatten(1).float().mean(1)
    assert torch.allclose(own[perm != torch.arange(6)], kept[perm != torch.arange(6)])
    labels = torch.arange(6)
    assert torch.equal(mixed_labels(labels, perm, kept), torch.where(kept >= 0.5, labels, labels[perm]))
    same, _, kept = mix_batch(x, "none", step_generator(0, 0, 0))
    assert same is x and bool((kept == 1).all())


def test_label_only_victim_behind_serve_and_the_ledger_equals_the_servers_count(cli, real_serve, transfer, tmp_path):
    server = real_serve(mode="label")
    out = tmp_path / "knockoff.pt"
    result = cli("distill", "--teacher", server.url, "--transfer", transfer, "--queries", "40", *STUDENT, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "a seeded random subset was queried" in result.stderr  # 48 images, budget 40
    assert "loss" in result.stderr
    s = queries_of(out)
    assert s["queries"] == 40 == server.accounts()["anonymous"]["images"]
    assert json.loads(json.dumps(s))["server"]["charged"] == 40


def test_kill_9_while_labelling_then_rerun_pays_for_nothing_twice(models, real_serve, transfer, tmp_path):
    """The run is killed (-9) right after its second teacher call was answered and recorded; the
    re-run answers those images from the ledger's cache, and the server's count equals the
    ledger's: nothing is paid twice."""
    server = real_serve(mode="probs")
    out = tmp_path / "s.pt"
    args = [
        "distill",
        "--teacher",
        server.url,
        "--transfer",
        str(transfer),
        "--query-batch",
        "16",
        "--student",
        "lenet5",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "-o",
        str(out),
    ]
    code = "\n".join(
        [
            "import os, signal",
            "from fakecifar import ledger",
            "from fakecifar.cli.app import main",
            "real = ledger.QueryLedger.ask",
            "calls = []",
            "def ask(self, teacher, images):",
            "    answers = real(self, teacher, images)",
            "    calls.append(1)",
            "    if len(calls) == 2:",
            "        os.kill(os.getpid(), signal.SIGKILL)",
            "    return answers",
            "ledger.QueryLedger.ask = ask",
            f"main({args!r})",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert server.accounts()["anonymous"]["images"] == 32
    from fakecifar.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["-q", *args])
    assert exit_info.value.code == 0
    s = queries_of(out)
    assert server.accounts()["anonymous"]["images"] == 48 == s["queries"]  # nothing paid twice
    assert s["unique"] == 48 and s["repeated"] == 0 and s["cache_hits"] >= 32


# --------------------------------------------------------------------------- bad input


def test_teacher_classes_differ_refused_or_mapped(cli, models, tmp_path):
    other = write_set(tmp_path / "other", 32, seed=5, classes=list(reversed(CLASSES)))
    out = tmp_path / "m.pt"
    result = cli("distill", "--teacher", models.pt, "--transfer", other, *STUDENT, "-o", out)
    assert result.exit_code == 2
    one_error_line(result, "the teacher's classes", "(4 classes)", "--map-classes", command="distill", last=True)
    assert not out.exists()
    mapped = cli("distill", "--teacher", models.pt, "--transfer", other, "--map-classes", *STUDENT, "-o", out)
    assert mapped.exit_code == 0, mapped.stderr
    labelled = open_shards([Path(str(out) + ".transfer")])
    assert labelled.classes == CLASSES  # the student learns the teacher's classes
    assert np.array_equal(labelled.read("labels"), 3 - np.arange(32) % 4)  # own labels mapped by name


def test_budget_smaller_than_a_batch_and_empty_transfer(cli, models, transfer, tmp_path):
    small = cli(
        "distill", "--teacher", models.pt, "--transfer", transfer, "--queries", "10", *STUDENT, "-o", tmp_path / "a.pt"
    )
    assert small.exit_code == 2
    one_error_line(small, "--queries 10 is smaller than one batch (16 images)", command="distill", last=True)
    empty = tmp_path / "empty"
    with ShardWriter(empty / "e.h5", classes=CLASSES, image_size=(SIZE, SIZE), producer="test"):
        pass
    describe_directory(empty)
    none = cli("distill", "--teacher", models.pt, "--transfer", empty, *STUDENT, "-o", tmp_path / "b.pt")
    assert none.exit_code == 2
    one_error_line(none, "holds no images", command="distill", last=True)
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_resume_with_another_teacher_or_student_is_refused(cli, models, transfer, tmp_path):
    out = tmp_path / "s.pt"
    assert cli("distill", "--teacher", models.pt, "--transfer", transfer, *STUDENT, "-o", out).exit_code == 0
    before = out.read_bytes()
    other_teacher = cli("distill", "--resume", out, "--teacher", models.onnx, "--epochs", "3")
    assert other_teacher.exit_code == 2
    one_error_line(other_teacher, "query ledger belongs to", command="distill", last=True)
    other_student = cli("distill", "--resume", out, "--student", "resnet20", "--epochs", "3")
    assert other_student.exit_code == 2
    one_error_line(other_student, "lenet5", "resnet20", command="distill", last=True)
    assert out.read_bytes() == before


def test_a_malicious_pickle_teacher_is_refused_and_never_run(cli, transfer, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    result = cli("distill", "--teacher", evil, "--transfer", transfer, *STUDENT, "-o", tmp_path / "s.pt")
    assert result.exit_code == 2, result.stderr
    assert str(evil) in result.stderr and not marker.exists()


def test_distill_options_come_from_the_training_registry():
    """One definition per setting: distill's student options are train's (less --soft, --adv)."""
    from fakecifar.cli.distill import NOT_FOR_STUDENTS, STUDENT_SETTINGS
    from fakecifar.training.config import TRAIN_SETTINGS

    assert {s.name for s in STUDENT_SETTINGS} == {s.name for s in TRAIN_SETTINGS} - set(NOT_FOR_STUDENTS)
    by_name = {s.name: s for s in TRAIN_SETTINGS}
    for s in STUDENT_SETTINGS:
        if s.name != "model":
            assert s is by_name[s.name]


def test_offline_distillation_under_torchrun(models, transfer, tmp_path):
    """Two processes on gloo: rank 0 asks the teacher once per image, both train; one student."""
    import os

    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [
            *torchrun,
            "-m",
            "fakecifar",
            "distill",
            "--teacher",
            str(models.pt),
            "--transfer",
            str(transfer),
            *STUDENT,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    from fakecifar.checkpoint import load_checkpoint

    meta = load_checkpoint(out)[1]["train"]
    assert meta["world_size"] == 2 and meta["queries"]["queries"] == 48 and meta["queries"]["unique"] == 48


def test_online_distillation_under_torchrun_pays_what_one_process_pays(cli, models, transfer, tmp_path):
    """Two processes on gloo, --online: rank 0 asks the teacher for both processes' views each
    step; the ledger counts what one process would have asked, in as many steps."""
    import os

    one = tmp_path / "one.pt"
    result = cli("distill", "--teacher", models.pt, "--transfer", transfer, "--online", *STUDENT, "-o", one)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "fakecifar", "distill", "--teacher", str(models.pt), "--transfer", str(transfer)]
        + ["--online", *STUDENT, "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    from fakecifar.checkpoint import load_checkpoint

    single, ddp = load_checkpoint(one)[1]["train"], load_checkpoint(out)[1]["train"]
    assert ddp["world_size"] == 2
    assert ddp["queries"]["queries"] == single["queries"]["queries"] == 2 * 48


def test_fast_teacher_pass_is_asked_for_and_recorded(cli, models, transfer, tmp_path):
    from fakecifar.checkpoint import load_checkpoint

    out = tmp_path / "fast.pt"
    result = cli(
        "distill", "--teacher", models.pt, "--transfer", transfer, "--online", "--fast-teacher", *STUDENT, "-o", out
    )
    assert result.exit_code == 0, result.stderr
    distilled = load_checkpoint(out)[1]["train"]["distill"]
    assert distilled["fast_teacher"] is True and distilled["teacher_describe"]["fast"] is True
