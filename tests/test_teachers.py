"""Teachers: local torch (.pt, foreign .th with an arch; white-box), local .onnx and remote URLs
(the `fakecifar serve` protocol of docs/serve.md, against a real HTTP server on 127.0.0.1), in
every output mode; safe loading; a remote teacher that is down, slow or answers garbage. The
fixture server and models live in teacher_server.py."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from teacher_server import (
    CLASSES,
    FAST,
    MODES,
    SIZE,
    Models,
    free_port,
    images,
    reference_logits,
    same_answers,
)
from torch import nn

from fakecifar.answers import Answers, parse_mode
from fakecifar.checkpoint import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from fakecifar.errors import BadCheckpointError, BadImageError
from fakecifar.ledger import QueryLedger
from fakecifar.teachers import (
    BadTeacherError,
    BudgetExhausted,
    TeacherError,
    TorchTeacher,
    derivable,
    describe_line,
    image_keys,
    open_teacher,
)

# ----------------------------------------------------------------------------- local teachers


@pytest.mark.parametrize("mode", MODES)
def test_local_teachers_answer_as_from_logits_in_every_mode(models: Models, mode: str) -> None:
    x = images(7)
    ref = reference_logits(models.model, x)
    want = Answers.from_logits(ref, parse_mode(mode))
    pt = open_teacher(models.pt, mode=mode, device="cpu")
    same_answers(pt.query(x), want)
    assert pt.kind == "torch" and pt.white_box and pt.classes == CLASSES and pt.input_size == (SIZE, SIZE)

    onnx = open_teacher(models.onnx, mode=mode)
    assert onnx.kind == "onnx" and not onnx.white_box and onnx.module is None
    got = onnx.query(x)
    # onnxruntime's float arithmetic differs from torch's in the last bits: the same answers
    # up to that (labels identical), and exactly what Answers.from_logits makes of its logits.
    np.testing.assert_array_equal(got.labels, want.labels)
    if want.log_probs is not None and mode != "probs:2":
        assert got.log_probs is not None
        np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-4)
    ort_logits = onnx.clf.model.predict_logits(x)  # type: ignore[attr-defined]
    same_answers(got, Answers.from_logits(ort_logits, parse_mode(mode)))

    # A foreign file records no size; the ResNet-CIFAR files are CIFAR's 32x32.
    th = open_teacher(models.th, mode=mode, arch="resnet20", device="cpu")
    assert th.classes == list(CIFAR10_CLASSES) and th.input_size == (32, 32) and th.white_box
    x32 = images(5, size=32)
    th_ref = reference_logits(models.th_model, x32, IMAGENET_MEAN, IMAGENET_STD)
    same_answers(th.query(x32), Answers.from_logits(th_ref, parse_mode(mode)))


def test_torch_teacher_is_white_box(models: Models) -> None:
    teacher = open_teacher(models.pt, device="cpu")
    assert teacher.module is not None and not teacher.module.training
    x = torch.from_numpy(images(3)).requires_grad_(True)
    out = teacher.module(x)  # takes [0, 1] pixels: normalization is inside
    np.testing.assert_allclose(out.detach().numpy(), reference_logits(models.model, images(3)), rtol=1e-5, atol=1e-5)
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients with respect to the input
    bns = [m for m in teacher.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_var is not None and m.running_var.abs().sum() > 0 for m in bns)
    d = teacher.describe()
    assert d["kind"] == "torch" and d["white_box"] and len(d["sha256"]) == 64 and d["arch"] == "resnet20"
    assert teacher.identity()["sha256"] == d["sha256"]
    line = describe_line(teacher)
    assert line.startswith("victim.pt (torch, white-box, sha256 ") and "mode logits" in line, line


def test_torch_tensor_and_float64_input(models: Models) -> None:
    teacher = open_teacher(models.pt, mode="probs", device="cpu")
    x = images(4)
    same_answers(teacher.query(torch.from_numpy(x)), teacher.query(x))
    same_answers(teacher.query(x.astype(np.float64)), teacher.query(x))
    assert len(teacher.query(np.zeros((0, 3, SIZE, SIZE), np.float32))) == 0


def test_sub_batches_on_the_cpu_answer_bit_for_bit_as_one_pass(models: Models) -> None:
    teacher = open_teacher(models.pt, mode="logits", device="cpu", batch_size=512)
    assert isinstance(teacher, TorchTeacher) and teacher.forward_batch == 128  # 16x16: 32 of 32x32 in pixels
    x = images(300)  # three sub-batches of 100 in one attempt
    same_answers(teacher.query(x), Answers.from_logits(reference_logits(models.model, x), parse_mode("logits")))
    th = open_teacher(models.th, arch="resnet20", device="cpu")
    assert isinstance(th, TorchTeacher) and th.forward_batch == 32


def test_the_fast_pass_answers_the_same_to_float_rounding(models: Models) -> None:
    x = images(12)
    exact = open_teacher(models.pt, mode="logits", device="cpu")
    fast = open_teacher(models.pt, mode="logits", device="cpu", fast=True)
    assert isinstance(fast, TorchTeacher) and fast.module is not None
    assert fast.identity() == exact.identity()  # the same teacher: one ledger
    assert fast.describe()["fast"] is True and "fast" not in exact.describe()
    convs = [m for m in fast.module.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.module.modules()), "the white-box module keeps its BNs"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast._net.modules()), "folded into the convolutions"
    want, got = exact.query(x), fast.query(x)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]
    same_answers(want, Answers.from_logits(reference_logits(models.model, x), parse_mode("logits")))  # bit for bit
    inp = torch.from_numpy(x[:3]).requires_grad_(True)  # white-box forwards keep working
    fast.module(inp)[:, 0].sum().backward()
    assert inp.grad is not None and inp.grad.abs().sum() > 0


class DataDependent(nn.Module):
    """A model torch.fx cannot trace (Python control flow on a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.mean((2, 3)) if bool(y.sum() > 0) else -y.mean((2, 3))


def test_the_fast_pass_keeps_the_module_when_it_cannot_fold_it() -> None:
    from fakecifar.teachers import fold_batchnorm

    module = DataDependent().eval()
    assert fold_batchnorm(module, (SIZE, SIZE), "cpu") is module
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    folded = fold_batchnorm(plain, (SIZE, SIZE), "cpu")
    assert folded is not plain and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_image_keys_are_the_sha256_of_the_float32_bytes() -> None:
    x = images(5)
    want = [hashlib.sha256(img.tobytes()).digest() for img in x]
    assert image_keys(x) == want
    assert image_keys(np.asfortranarray(x)) == want  # not C-contiguous: the same bytes are hashed
    assert image_keys(x[::2]) == want[::2] and image_keys(x[:0]) == []


def test_batches_larger_than_max_batch(models: Models) -> None:
    small = open_teacher(models.pt, device="cpu", batch_size=3)
    whole = open_teacher(models.pt, device="cpu")
    x = images(10)
    np.testing.assert_allclose(small.query(x).logits, whole.query(x).logits, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad, needle",
    [
        (np.zeros((2, 3, 8, 8), np.float32), "takes 16x16 images"),
        (np.zeros((2, SIZE, SIZE, 3), np.float32), "[N, 3, H, W]"),
        ((np.ones((2, 3, SIZE, SIZE)) * 255).astype(np.uint8), "float images"),
        (np.full((2, 3, SIZE, SIZE), 1.5, np.float32), "in [0, 1]"),
        (np.full((2, 3, SIZE, SIZE), np.nan, np.float32), "finite"),
        (np.pad(np.full((1, 3, SIZE, SIZE), np.inf, np.float32), ((1, 0), (0, 0), (0, 0), (0, 0))), "finite"),
        (np.full((2, 3, SIZE, SIZE), -np.inf, np.float32), "finite"),
    ],
)
def test_bad_images_are_refused(models: Models, bad: np.ndarray, needle: str) -> None:
    teacher = open_teacher(models.pt, device="cpu")
    with pytest.raises(BadImageError) as info:
        teacher.query(bad)
    assert needle in str(info.value) and info.value.exit_code == 2


def test_foreign_th_needs_an_arch(models: Models) -> None:
    with pytest.raises(BadCheckpointError) as info:
        open_teacher(models.th, device="cpu")
    assert "--arch resnet20" in str(info.value) and info.value.exit_code == 2
    assert open_teacher(models.th, arch="auto", device="cpu").classes == list(CIFAR10_CLASSES)


class RunsShell:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


@pytest.mark.parametrize("arch", [None, "resnet20", "auto"])
def test_malicious_pickle_teacher_is_refused_and_never_run(tmp_path: Path, arch: str | None) -> None:
    marker = tmp_path / "pwned"
    payload = RunsShell(f"touch {shlex.quote(str(marker))}")
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": payload, "format": "fakecifar-checkpoint"}, zipped)
    legacy = tmp_path / "evil.th"  # the pre-1.6 layout of the ResNet-CIFAR files: a bare pickle
    legacy.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(BadCheckpointError) as info:
            open_teacher(path, arch=arch, device="cpu")
        assert str(path) in str(info.value) and "refused" in str(info.value), info.value
        assert info.value.exit_code == 2
        assert not marker.exists(), "the payload ran"
    pickle.loads(legacy.read_bytes())  # control: the payload is live when unpickled unsafely
    assert marker.exists()


def test_not_a_model_and_unknown_schemes(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(BadCheckpointError, match="not a model file"):
        open_teacher(text)
    with pytest.raises(BadTeacherError, match="only http:// and https://"):
        open_teacher("ftp://example.com/model.pt")
    with pytest.raises(Exception, match="no such file"):
        open_teacher(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- output modes


def test_derivable_modes() -> None:
    m = parse_mode
    assert all(derivable(m("logits"), m(x)) for x in MODES)
    assert all(derivable(m(s), m("label")) for s in MODES)
    assert derivable(m("probs"), m("probs:3")) and derivable(m("probs"), m("topk:2"))
    assert derivable(m("topk:3"), m("topk:2")) and not derivable(m("topk:2"), m("topk:3"))
    assert not derivable(m("probs:2"), m("probs")) and not derivable(m("probs:2"), m("probs:1"))
    assert not derivable(m("label"), m("probs")) and not derivable(m("topk:3"), m("probs"))
    assert not derivable(m("probs"), m("logits"))


# ----------------------------------------------------------------------------- remote teachers


@pytest.mark.parametrize("mode", MODES)
def test_remote_teacher_answers_as_the_local_one(serve: Any, models: Models, mode: str) -> None:
    srv = serve(mode=mode)
    remote = open_teacher(srv.url, **FAST)
    assert remote.kind == "remote" and not remote.white_box and remote.module is None
    assert str(remote.mode) == mode and remote.classes == CLASSES and remote.input_size == (SIZE, SIZE)
    x = images(9)
    local = open_teacher(models.pt, mode=mode, device="cpu")
    same_answers(remote.query(x), local.query(x))
    d = remote.describe()
    assert d["url"] == srv.url and d["model"] == "resnet20" and d["server_output"] == mode


@pytest.mark.parametrize(("server", "client"), [("logits", "probs:2"), ("logits", "topk:3"), ("probs", "label")])
def test_remote_teacher_derives_a_lesser_mode(serve: Any, models: Models, server: str, client: str) -> None:
    srv = serve(mode=server)
    remote = open_teacher(srv.url, mode=client, **FAST)
    x = images(6)
    same_answers(remote.query(x), open_teacher(models.pt, mode=client, device="cpu").query(x))


def test_remote_teacher_refuses_a_mode_the_server_does_not_give(serve: Any) -> None:
    srv = serve(mode="label")
    with pytest.raises(BadTeacherError) as info:
        open_teacher(srv.url, mode="probs", **FAST)
    assert srv.url in str(info.value) and "label" in str(info.value) and info.value.exit_code == 2


def test_url_forms_and_chunking_by_max_batch(serve: Any) -> None:
    srv = serve(max_batch=4)
    remote = open_teacher(srv.url + "/v1/predict", **FAST)
    assert remote.max_batch == 4 and remote.describe()["url"] == srv.url
    remote.query(images(10))
    assert srv.predict_requests == 3 and srv.charged() == 10
    tight = serve(max_bytes=3 * 4 * 4 * SIZE * SIZE)  # room for 2 images of base64 float32
    assert open_teacher(tight.url, **FAST).max_batch == 2


def test_remote_key_from_the_environment_is_sent_and_never_shown(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-0123456789abcdef"
    srv = serve(keys={secret: None})
    with pytest.raises(BadTeacherError) as info:  # no key: 401 is the user's to fix (exit 2)
        open_teacher(srv.url, **FAST).query(images(2))
    assert "401" in str(info.value) and info.value.exit_code == 2
    with pytest.raises(BadTeacherError, match="FC_TEACHER_KEY"):
        open_teacher(srv.url, api_key_env="FC_TEACHER_KEY", **FAST)
    monkeypatch.setenv("FC_TEACHER_KEY", secret)
    remote = open_teacher(srv.url, api_key_env="FC_TEACHER_KEY", **FAST)
    remote.query(images(3))
    assert srv.charged(secret) == 3 and remote.account() == 3
    shown = json.dumps(remote.describe()) + repr(remote) + str(vars(remote))
    assert secret not in shown
    wrong = open_teacher(srv.url, api_key="sk-wrong", **FAST)
    with pytest.raises(BadTeacherError) as info:
        wrong.query(images(1))
    assert "FC_TEACHER_KEY" not in str(info.value) and "sk-wrong" not in str(info.value)


def test_a_server_that_is_down(models: Models) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TeacherError) as info:
        open_teacher(url, **FAST)
    assert url in str(info.value) and "4 attempts" in str(info.value) and info.value.exit_code == 1
    assert time.monotonic() - started < 5


def test_html_and_garbage_health_is_not_a_teacher(tmp_path: Path) -> None:
    class Page(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = b"<html><head><title>Welcome to nginx!</title></head></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(TeacherError) as info:
            open_teacher(url, **FAST)
        assert url in str(info.value) and "Welcome to nginx!" in str(info.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


# Each fault is followed by a good answer: the call succeeds after a retry, and what the
# server charged for the fault (the protocol's rule, as the fixture applies it) is `lost`.
FAULTS = [
    ("500", 0),
    ("503html", 0),
    ("429", 0),
    ("html", 0),
    ("garbage", 0),
    ("reset", 0),
    ("shape", 1),
    ("count", 1),
    ("garbage-charged", 1),
    ("reset-charged", 1),
    ("slow", 1),
]


@pytest.mark.parametrize(("fault", "charged"), FAULTS)
def test_a_fault_is_retried_and_the_ledger_stays_exact(
    serve: Any, models: Models, tmp_path: Path, fault: str, charged: int
) -> None:
    srv = serve(mode="probs", faults=[fault], slow_seconds=1.5)
    remote = open_teacher(srv.url, retries=3, backoff=0.01, timeout=0.5 if fault == "slow" else 5.0)
    x = images(5)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        started = time.monotonic()
        got = ledger.ask(remote, x)
        elapsed = time.monotonic() - started
        same_answers(got, open_teacher(models.pt, mode="probs", device="cpu").query(x))
        s = ledger.summary()
    if fault == "slow":
        time.sleep(1.2)  # the slow answer is still being written when the client has given up
    assert srv.charged() == 5 * (1 + charged)
    assert s["queries"] == srv.charged() - s["server"]["base"], s
    assert s["unique"] == 5 and s["lost"] == 5 * charged and s["pending"] == 0
    assert s["requests"] == 2 and s["failed_requests"] == 1 and s["sent"] == 10
    assert s["server"]["foreign"] == 0 and s["server"]["discrepancy"] == 0
    if fault == "429":
        assert elapsed >= 0.2  # Retry-After was honoured


def test_persistent_failure_exits_1_naming_the_url_and_counts_nothing_charged(serve: Any, tmp_path: Path) -> None:
    srv = serve(faults=["500", "503html", "429", "html"])
    remote = open_teacher(srv.url, retries=3, backoff=0.01, timeout=5.0)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        with pytest.raises(TeacherError) as info:
            ledger.ask(remote, images(4))
        s = ledger.summary()
    assert srv.url in str(info.value) and "4 attempts" in str(info.value) and info.value.exit_code == 1
    assert "Portal login" in str(info.value)  # the last thing the server sent
    assert s["queries"] == 0 == srv.charged() and s["pending"] == 0
    assert s["requests"] == 4 and s["failed_requests"] == 4 and s["sent"] == 16


def test_a_server_too_slow_every_time(serve: Any, tmp_path: Path) -> None:
    """Each answer is charged but comes too late: exit 1 naming the URL, and the ledger asks the
    server's account what the timeouts cost (lost), so it still equals the server's count."""
    srv = serve(faults=["slow", "slow"], slow_seconds=0.8)
    remote = open_teacher(srv.url, retries=1, backoff=0.01, timeout=0.3)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        with pytest.raises(TeacherError) as info:
            ledger.ask(remote, images(3))
        s = ledger.summary()
    assert srv.url in str(info.value) and "2 attempts" in str(info.value) and info.value.exit_code == 1
    assert s["queries"] == 6 == srv.charged() == s["lost"] and s["pending"] == 0 and s["unique"] == 0


def test_a_server_that_dies_mid_run(serve: Any, tmp_path: Path) -> None:
    srv = serve()
    remote = open_teacher(srv.url, retries=2, backoff=0.01, timeout=2.0)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        ledger.ask(remote, images(4))
        srv.stop()
        with pytest.raises(TeacherError) as info:
            ledger.ask(remote, images(4, seed=1))
        s = ledger.summary()
    assert srv.url in str(info.value) and info.value.exit_code == 1
    assert s["queries"] == 4 == srv.charged() and s["pending"] == 0 and s["failed_requests"] == 3


def test_the_servers_budget_is_budget_exhausted(serve: Any, tmp_path: Path) -> None:
    srv = serve(keys={"k": 6})
    remote = open_teacher(srv.url, api_key="k", **FAST)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        ledger.ask(remote, images(4))
        with pytest.raises(BudgetExhausted) as info:
            ledger.ask(remote, images(4, seed=1))
        assert info.value.source == "server" and srv.url in str(info.value)
        assert ledger.summary()["queries"] == 4 == srv.charged("k")


def test_the_ledgers_budget_holds_when_a_charge_is_uncertain(serve: Any, tmp_path: Path) -> None:
    """A timeout the server charged: the retry would exceed --queries, so it is not sent."""
    srv = serve(faults=["slow"], slow_seconds=1.0)
    remote = open_teacher(srv.url, retries=3, backoff=0.01, timeout=0.4)
    with QueryLedger(tmp_path / "run.queries", teacher=remote, budget=6) as ledger:
        with pytest.raises(BudgetExhausted) as info:
            ledger.ask(remote, images(5))
        time.sleep(0.8)
        s = ledger.summary()
    assert info.value.source == "ledger"
    assert srv.charged() == 5 == s["queries"] == s["lost"] and s["pending"] == 0
    assert srv.predict_requests == 1  # the retry was never sent


def test_a_late_charge_is_counted_and_the_budget_still_holds(serve: Any, tmp_path: Path) -> None:
    """The server charges a request it finishes after the client gave up (timeout): the figure
    right after does not show it yet, so those images stay pending (counted against the budget)
    until a figure does, within the timeout attempt's window."""
    srv = serve(faults=["late"], slow_seconds=0.8)
    remote = open_teacher(srv.url, retries=2, backoff=0.01, timeout=0.3)
    with QueryLedger(tmp_path / "run.queries", teacher=remote, budget=10) as ledger:
        ledger.ask(remote, images(5))  # attempt 1 times out, attempt 2 is answered
        s = ledger.summary()
        assert s["queries"] == 5 == srv.charged() and s["pending"] == 5 and ledger.remaining == 0
        time.sleep(0.8)  # the first attempt is charged now
        assert srv.charged() == 10
        with pytest.raises(BudgetExhausted):  # the server is asked first: still no room
            ledger.ask(remote, images(1, seed=1))
        s = ledger.summary()
    assert s["queries"] == 10 == srv.charged() and s["lost"] == 5 and s["pending"] == 0
    assert srv.predict_requests == 2  # the budget was never overdrawn


def test_a_late_attempt_that_is_never_charged_expires(serve: Any, tmp_path: Path) -> None:
    srv = serve(faults=["late500"], slow_seconds=0.5)
    remote = open_teacher(srv.url, retries=2, backoff=0.01, timeout=0.3)
    with QueryLedger(tmp_path / "run.queries", teacher=remote) as ledger:
        ledger.ask(remote, images(5))
        assert ledger.summary()["pending"] == 5
        time.sleep(0.7)  # past the window (2 x timeout after the attempt began); the server said 500
        ledger.ask(remote, images(2, seed=1))  # its figure settles the late attempt as free
        s = ledger.summary()
    assert s["queries"] == 7 == srv.charged() and s["lost"] == 0 and s["pending"] == 0


def test_identity_and_description(serve: Any, models: Models) -> None:
    srv = serve(mode="topk:3")
    remote = open_teacher(srv.url, mode="label", **FAST)
    ident = remote.identity()
    assert ident == {
        "kind": "remote",
        "classes": CLASSES,
        "input_size": [SIZE, SIZE],
        "url": srv.url,
        "model": "resnet20",
    }
    assert "mode" not in open_teacher(models.onnx).identity()


# ----------------------------------------------------------------------------- the real server


def test_a_late_charge_by_fakecifar_serve(models: Models, tmp_path: Path) -> None:
    """The real server, with a model whose first forward pass outlasts the client's timeout: it
    charges that request when it is done, and the ledger counts it (lost) without overdrawing."""
    from fakecifar.evaluate import load_classifier
    from fakecifar.serve import Model, QueryServer, classifier_model

    base = classifier_model(load_classifier(models.pt, device="cpu"))
    calls = [0]

    def slow_first(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(1.0)
        return base.predict_logits(x)

    model = Model(slow_first, base.classes, base.input_size, base.name)
    with QueryServer(model, mode="probs", port=0, host="127.0.0.1") as server:
        remote = open_teacher(server.url, retries=2, backoff=0.01, timeout=0.6)
        with QueryLedger(tmp_path / "run.queries", teacher=remote, budget=10) as ledger:
            got = ledger.ask(remote, images(5))
            s = ledger.summary()  # the late charge is seen (lost) or still pending: both count
            assert s["queries"] + s["pending"] == 10 and ledger.remaining == 0, s
            with pytest.raises(BudgetExhausted):  # pending is settled with the server first
                ledger.ask(remote, images(1, seed=1))
            s = ledger.summary()
        assert s["queries"] == 10 == server.accounts()["anonymous"]["images"], s
        assert s["lost"] == 5 and s["pending"] == 0
    same_answers(got, open_teacher(models.pt, mode="probs", device="cpu").query(images(5)))


@pytest.mark.parametrize("mode", MODES)
def test_a_local_teacher_answers_what_fakecifar_serve_answers(real_serve: Any, models: Models, mode: str) -> None:
    server = real_serve(mode=mode)
    remote = open_teacher(server.url, **FAST)
    x = images(9, seed=3)
    for local in (open_teacher(models.pt, mode=mode, device="cpu"), open_teacher(models.onnx, mode=mode)):
        want = local.query(x)
        if local.kind == "torch":
            same_answers(remote.query(x), want)
        else:
            np.testing.assert_array_equal(remote.query(x).labels, want.labels)
    assert server.accounts()["anonymous"]["images"] == 18
