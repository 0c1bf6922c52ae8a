"""`fakecifar serve` (fakecifar.serve): the protocol of docs/serve.md, spoken over real HTTP to a
real server on 127.0.0.1 with a tiny real model; and the command itself as a subprocess."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from fakecifar.answers import Answers, answer, parse_mode
from fakecifar.errors import UsageError
from fakecifar.serve import (
    Model,
    QueryServer,
    classifier_model,
    encode_images,
    parse_keys,
    parse_predict,
    serve,
    to_model_input,
)

from helpers import CLASSES3, REPO, random_images

SIZE = (8, 8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch

    from fakecifar.checkpoint import save_checkpoint
    from fakecifar.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20", len(CLASSES3)).eval()
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    return save_checkpoint(
        path, net, arch="resnet20", classes=CLASSES3, mean=[0.5] * 3, std=[0.25] * 3, input_size=list(SIZE)
    )


@pytest.fixture(scope="module")
def model(model_file) -> Model:
    from fakecifar.evaluate import load_classifier

    return classifier_model(load_classifier(model_file, device="cpu"))


def images(n: int, seed: int = 0) -> np.ndarray:
    return random_images(n, SIZE, seed)


def predict(server: QueryServer, x: np.ndarray | dict, key: str | None = None, session=None) -> requests.Response:
    body = {"images": encode_images(x) if isinstance(x, np.ndarray) else x}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return (session or requests).post(f"{server.url}/v1/predict", json=body, headers=headers, timeout=30)


def raw_request(port: int, data: bytes, *, shut: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; (status, headers, body) of the answer, read to its length."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def expected(model: Model, x: np.ndarray, mode: str) -> dict:
    return json.loads(json.dumps(answer(model.predict_logits(to_model_input(x)), parse_mode(mode))))


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("mode", ["logits", "probs", "probs:3", "topk:2", "label"])
def test_every_output_mode_answers_what_answers_gives(model, mode):
    x = images(5)
    with serve(model, mode=mode, port=0) as server:
        got = predict(server, x)
        assert got.status_code == 200 and got.headers["Content-Type"] == "application/json"
        body = got.json()
        # float32 NCHW in [0, 1] is the same question, asked as a student's batch would ask it
        as_float = predict(server, to_model_input(x)).json()
    fields = expected(model, x, mode)
    assert {k: body[k] for k in fields} == fields
    assert body["n"] == 5 and body["output"] == mode
    assert {k: as_float[k] for k in fields} == fields
    keys = {"logits": "logits", "probs": "probs", "probs:3": "probs", "topk:2": "topk", "label": "labels"}
    assert set(body) == {"n", "output", "usage", keys[mode]}
    read = Answers.from_wire(body, parse_mode(mode), num_classes=len(CLASSES3))  # what a client reads back
    assert read.labels.tolist() == expected(model, x, "label")["labels"]


def test_health_describes_the_service(model):
    with serve(model, mode="topk:2", port=0, max_batch=7, max_bytes=4096, rate=3.0) as server:
        health = requests.get(f"{server.url}/v1/health", timeout=10).json()
    assert health == {
        "status": "ok",
        "model": "resnet20",
        "classes": CLASSES3,
        "input_size": list(SIZE),
        "output": "topk:2",
        "max_batch": 7,
        "max_bytes": 4096,
        "rate": 3.0,
        "keys": False,
    }


# ----------------------------------------------------------------------------- accounting


def test_usage_is_exact_across_requests_and_in_the_usage_file(model, tmp_path):
    usage_file = tmp_path / "usage.json"
    with serve(model, mode="label", port=0, usage_file=usage_file) as server:
        assert json.loads(usage_file.read_text())["total"] == {"images": 0, "requests": 0}
        session = requests.Session()
        sizes = [1, 7, 3, 256, 2]
        for i, n in enumerate(sizes):
            got = predict(server, images(n, seed=i), session=session).json()
            assert got["usage"]["images"] == sum(sizes[: i + 1]) and got["usage"]["requests"] == i + 1
            # written before the answer was sent: what a client has, the file already counts
            assert json.loads(usage_file.read_text())["accounts"]["anonymous"] == got["usage"]
        predict(server, images(1)[:, :4], session=session)  # a bad request is not charged
        usage = session.get(f"{server.url}/v1/usage", timeout=10).json()
        session.close()
    total = sum(sizes)
    assert usage == {"images": total, "requests": len(sizes), "budget": None, "remaining": None}
    assert server.accounts() == {"anonymous": usage}
    document = json.loads(usage_file.read_text())
    assert document["format"] == "fakecifar-serve-usage" and document["total"] == {"images": total, "requests": 5}
    assert document["output"] == "label" and document["model"] == "resnet20"


def test_concurrent_clients_are_counted_exactly(model, tmp_path):
    usage_file = tmp_path / "usage.json"
    sizes = [[1 + (7 * t + 3 * i) % 9 for i in range(6)] for t in range(6)]
    failures: list[int] = []
    with serve(model, mode="label", port=0, usage_file=usage_file) as server:

        def client(mine: list[int]) -> None:
            with requests.Session() as session:
                for i, n in enumerate(mine):
                    got = predict(server, images(n, seed=i), session=session)
                    if got.status_code != 200 or len(got.json()["labels"]) != n:
                        failures.append(got.status_code)

        workers = [threading.Thread(target=client, args=(s,)) for s in sizes]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not failures
    want = {"images": sum(map(sum, sizes)), "requests": sum(map(len, sizes))}
    assert server.totals() == want == json.loads(usage_file.read_text())["total"]


def test_budget_refuses_with_402_and_charges_nothing(model):
    with serve(model, mode="label", port=0, budget=5) as server:
        assert predict(server, images(3)).json()["usage"] == {
            "images": 3,
            "requests": 1,
            "budget": 5,
            "remaining": 2,
        }
        over = predict(server, images(3))
        assert over.status_code == 402 and over.json()["error"]["code"] == "budget_exhausted"
        assert "2 left" in over.json()["error"]["message"]
        assert predict(server, images(2)).json()["usage"]["remaining"] == 0
        assert predict(server, images(1)).status_code == 402
    assert server.accounts()["anonymous"] == {"images": 5, "requests": 2, "budget": 5, "remaining": 0}


class GatedModel:
    """The tiny model, held at the door of each forward pass until `release` is set."""

    def __init__(self, model: Model):
        self.inner, self.entered, self.release = model, threading.Event(), threading.Event()

    def model(self) -> Model:
        def predict_logits(x):
            self.entered.set()
            assert self.release.wait(30)
            return self.inner.predict_logits(x)

        return Model(predict_logits, self.inner.classes, self.inner.input_size, "gated")


def test_concurrent_requests_cannot_overdraw_a_budget(model):
    gate = GatedModel(model)
    with serve(gate.model(), mode="label", port=0, budget=4) as server:
        first: list[requests.Response] = []
        worker = threading.Thread(target=lambda: first.append(predict(server, images(3))))
        worker.start()
        assert gate.entered.wait(30)  # 3 images reserved, the model is running
        second = predict(server, images(3))
        gate.release.set()
        worker.join()
    assert first[0].status_code == 200 and second.status_code == 402
    assert server.accounts()["anonymous"]["images"] == 3


def test_keys_authenticate_and_are_accounted_apart(model, tmp_path):
    text = "# experiment keys\nalpha-secret-1 100\n\nbeta-secret-2  # no budget of its own\n"
    keys = parse_keys(text, default_budget=9)
    logged: list = []
    usage_file = tmp_path / "usage.json"
    with serve(model, mode="probs", port=0, keys=keys, usage_file=usage_file, on_request=logged.append) as server:
        health = requests.get(f"{server.url}/v1/health", timeout=10)
        assert health.status_code == 200 and health.json()["keys"] is True  # health needs no key
        missing = predict(server, images(2))
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert predict(server, images(2), key="alpha-secret-X").status_code == 401
        assert requests.get(f"{server.url}/v1/usage", timeout=10).status_code == 401
        assert predict(server, images(2), key="alpha-secret-1").status_code == 200
        assert predict(server, images(4), key="beta-secret-2").json()["usage"] == {
            "images": 4,
            "requests": 1,
            "budget": 9,
            "remaining": 5,
        }
        mine = requests.get(
            f"{server.url}/v1/usage", headers={"Authorization": "Bearer alpha-secret-1"}, timeout=10
        ).json()
    assert mine == {"images": 2, "requests": 1, "budget": 100, "remaining": 98}
    assert server.accounts() == {
        "key 2": mine,
        "key 4": {"images": 4, "requests": 1, "budget": 9, "remaining": 5},
    }
    shown = usage_file.read_text() + repr(logged) + repr(keys)
    assert "secret" not in shown  # keys are named by their line, never shown
    assert [e.account for e in logged if e.path == "/v1/predict" and e.status == 200] == ["key 2", "key 4"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "no keys"),
        ("k1\nk1 5\n", "line 2: the same key as line 1"),
        ("k1 lots\n", "line 1: the budget is not a whole number"),
        ("k1 5 6\n", "line 1: 3 fields"),
        ("k\u00e9y\n", "outside printable ASCII"),
    ],
)
def test_bad_keys_files_are_usage_errors_naming_the_line_not_the_key(text, needle):
    with pytest.raises(UsageError) as err:
        parse_keys(text, source="keys.txt")
    assert needle in str(err.value) and "k1" not in str(err.value).replace("line 1", "")


def test_rate_limit_answers_429_with_retry_after_and_charges_nothing(model):
    keys = parse_keys("first\nsecond\n")
    with serve(model, mode="label", port=0, keys=keys, rate=0.01) as server:
        assert predict(server, images(1), key="first").status_code == 200
        limited = predict(server, images(1), key="first")
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 100
        assert 0 < int(limited.headers["Retry-After-Ms"]) <= 100_000
        assert predict(server, images(1), key="second").status_code == 200  # per key
    assert server.accounts()["key 1"]["requests"] == 1


# ----------------------------------------------------------------------------- bad requests


def _spec(**overrides) -> dict:
    spec = encode_images(images(2))
    spec.update(overrides)
    return spec


def _floats(values: np.ndarray) -> dict:
    return encode_images(np.ascontiguousarray(values, dtype=np.float32))


BAD_BODIES = {
    "not JSON": (b"{not json", 400, "bad_json"),
    "not UTF-8": (b"\xff\xfe\x00{", 400, "bad_json"),
    "nested too deep": (b"[" * 10_000 + b"]" * 10_000, 400, "bad_json"),
    "not an object": (b"[1, 2]", 400, "bad_json"),
    "no images": (b'{"pictures": {}}', 400, "bad_json"),
    "images not an object": (b'{"images": "abc"}', 400, "bad_json"),
    "wrong dtype": (_spec(dtype="int16"), 400, "bad_images"),
    "wrong layout": (_spec(layout="NCHW"), 400, "bad_images"),
    "wrong shape rank": (_spec(shape=[2, 8, 8]), 400, "bad_images"),
    "shape not integers": (_spec(shape=[2, 8.0, 8, 3]), 400, "bad_images"),
    "wrong channels": (_spec(shape=[2, 8, 8, 1]), 400, "bad_images"),
    "wrong image size": (encode_images(random_images(2, (9, 8))), 400, "bad_images"),
    "no images in the batch": (_spec(shape=[0, 8, 8, 3], data=""), 400, "bad_images"),
    "bad base64": (_spec(data="!!!!" + _spec()["data"][4:]), 400, "bad_images"),
    "base64 with line breaks": (_spec(data=_spec()["data"][:8] + "\n" + _spec()["data"][8:]), 400, "bad_images"),
    "byte count": (_spec(shape=[3, 8, 8, 3]), 400, "bad_images"),
    "NaN": (_floats(np.full((1, 3, 8, 8), np.nan)), 400, "bad_images"),
    "infinity": (_floats(np.full((1, 3, 8, 8), np.inf)), 400, "bad_images"),
    "outside [0, 1]": (_floats(np.full((1, 3, 8, 8), 1.5)), 400, "bad_images"),
    "too large a batch": (encode_images(random_images(5, SIZE)), 413, "too_large"),
    "too many bytes": (encode_images(random_images(4, (64, 64))), 413, "too_large"),
}


def test_every_bad_request_gets_a_4xx_json_error_and_the_server_goes_on(model):
    with serve(model, mode="label", port=0, max_batch=4, max_bytes=32 * 1024) as server:
        session = requests.Session()
        for what, (body, status, code) in BAD_BODIES.items():
            if isinstance(body, dict):
                body = json.dumps({"images": body}).encode()
            got = session.post(f"{server.url}/v1/predict", data=body, timeout=30)
            assert (got.status_code, got.json()["error"]["code"]) == (status, code), what
            assert got.json()["error"]["message"], what
            assert predict(server, images(1), session=session).status_code == 200, f"after {what}"
        assert server.accounts()["anonymous"]["images"] == len(BAD_BODIES)  # only the good ones
        session.close()


def test_malformed_http_gets_json_errors_too(model):
    with serve(model, mode="label", port=0, max_bytes=4096) as server:
        port = server.port
        cases = [
            (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required"),
            (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, None),
            (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", 400, "bad_request"),
            # refused from the header alone: the client is told before it sends the body
            (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n", 413, None),
            (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n" + b"x" * 10000, 413, "too_large"),
            (b"GET /v1/predict HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
            (b"DELETE /v1/health HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
            (b"GET /admin HTTP/1.1\r\n\r\n", 404, "not_found"),
            (b"BREW /v1/health HTTP/1.1\r\n\r\n", 501, "not_implemented"),
            (b"this is not http\r\n\r\n", 400, "bad_request"),
        ]
        for data, status, code in cases:
            got_status, headers, body = raw_request(port, data, shut=b"chunked" not in data)
            assert got_status == status, data
            assert headers["content-type"] == "application/json", data
            assert json.loads(body)["error"]["code"] == (code or json.loads(body)["error"]["code"]), data
        head_status, head_headers, head_body = raw_request(port, b"HEAD /v1/health HTTP/1.1\r\n\r\n", shut=True)
        assert head_status == 405 and head_body == b""
        assert predict(server, images(1)).status_code == 200


def test_a_model_that_fails_answers_500_charges_nothing_and_the_server_goes_on(model):
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return model.predict_logits(x)

    errors: list[str] = []
    broken = Model(flaky, model.classes, model.input_size, "flaky")
    with serve(broken, mode="label", port=0, on_error=errors.append) as server:
        failed = predict(server, images(2))
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal"
        assert predict(server, images(2)).status_code == 200
    assert server.accounts()["anonymous"]["images"] == 2
    assert errors and "out of memory" in errors[0]


def test_parse_predict_is_a_pure_function():
    x = images(3)
    body = json.dumps({"images": encode_images(x), "future_field": 1}).encode()
    got = parse_predict(body, input_size=SIZE, max_batch=3)
    assert got.dtype == np.float32 and got.shape == (3, 3, 8, 8) and got.flags.writeable
    np.testing.assert_array_equal(got, to_model_input(x))
    spec = encode_images(x)
    assert base64.b64decode(spec["data"]) == x.tobytes() and spec["layout"] == "NHWC"


# ----------------------------------------------------------------------------- life cycle


def _stop_within(server: QueryServer, seconds: float = 20) -> None:
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(seconds)
    assert not stopper.is_alive(), "stop() hung"


def test_stop_joins_every_thread_even_with_idle_and_silent_connections(model):
    baseline = threading.active_count()
    server = QueryServer(model, mode="label", port=0).start()
    session = requests.Session()  # keeps its connection open (keep-alive) between requests
    for _ in range(3):
        assert predict(server, images(2), session=session).status_code == 200
    silent = socket.create_connection(("127.0.0.1", server.port))  # connects, never speaks
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")  # stalls mid-body
    assert threading.active_count() > baseline
    _stop_within(server)
    assert threading.active_count() == baseline
    assert server.accounts()["anonymous"]["requests"] == 3
    for sock in (silent, half):
        sock.close()
    session.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v1/health", timeout=5)


def test_stop_lets_the_request_in_flight_finish(model):
    gate = GatedModel(model)
    server = QueryServer(gate.model(), mode="label", port=0).start()
    answers: list[requests.Response] = []
    client = threading.Thread(target=lambda: answers.append(predict(server, images(3))))
    client.start()
    assert gate.entered.wait(30)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    gate.release.set()
    client.join(30)
    stopper.join(30)
    assert not stopper.is_alive() and answers[0].status_code == 200
    assert answers[0].json()["usage"]["images"] == 3 == server.accounts()["anonymous"]["images"]


def test_connections_beyond_the_limit_get_503(model):
    with serve(model, mode="label", port=0, max_connections=2) as server:
        sessions = [requests.Session() for _ in range(2)]
        for s in sessions:
            assert s.get(f"{server.url}/v1/health", timeout=10).status_code == 200  # both stay open
        status, headers, body = raw_request(server.port, b"GET /v1/health HTTP/1.1\r\n\r\n")
        assert status == 503 and json.loads(body)["error"]["code"] == "unavailable" and headers["retry-after"]
        sessions[0].close()
        for _ in range(100):  # the server notices the closed connection a moment later
            if raw_request(server.port, b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")[0] == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("a slot never came free")
        sessions[1].close()


def test_listening_on_a_busy_port_is_a_clear_error(model):
    with serve(model, port=0) as server:
        other = QueryServer(model, port=server.port)
        with pytest.raises(Exception) as err:
            other.start()
    assert f"cannot listen on http://127.0.0.1:{server.port}" in str(err.value)
    assert "--port 0" in str(err.value)


# ----------------------------------------------------------------------------- the command


def _read_line(stream, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, "the server printed no URL"
    return stream.readline().strip()


def test_command_end_to_end_url_on_stdout_sigterm_prints_usage_and_exits_0(model_file, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("key-for-alice 50\nkey-for-bob\n")
    usage_file = tmp_path / "usage.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakecifar", "serve", str(model_file), "--port", "0", "--output", "label",
         "--keys", str(keys), "--usage-file", str(usage_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        url = _read_line(proc.stdout, 60)
        assert url.startswith("http://127.0.0.1:")
        auth = {"Authorization": "Bearer key-for-alice"}
        body = {"images": encode_images(images(4))}
        got = requests.post(f"{url}/v1/predict", json=body, headers=auth, timeout=30)
        assert got.status_code == 200 and len(got.json()["labels"]) == 4
        assert requests.post(f"{url}/v1/predict", json=body, timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # as `timeout` does: to the command, then to its group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == ""  # the URL was the only line on stdout
    assert "usage: key 1: 4 images in 1 requests (budget 50, 46 left)" in err
    assert "usage: key 2: 0 images in 0 requests" in err
    assert "usage: total: 4 images in 1 requests" in err
    assert "POST /v1/predict 200 key 1 4 images" in err and "401 unauthorized" in err
    assert "key-for" not in err
    assert json.loads(usage_file.read_text())["accounts"]["key 1"]["images"] == 4


def test_command_usage_errors_come_before_the_model_loads(cli, model_file, tmp_path):
    from helpers import one_error_line

    one_error_line(cli("serve", model_file, "--output", "topk"), "positive K", command="serve")
    assert cli("serve", model_file, "--output", "topk").exit_code == 2
    bad_keys = tmp_path / "keys.txt"
    bad_keys.write_text("only-key 12 extra\n")
    result = cli("serve", model_file, "--keys", bad_keys)
    assert result.exit_code == 2
    one_error_line(result, "line 1", command="serve")
    assert "only-key" not in result.stderr
    assert cli("serve", tmp_path / "missing.pt").exit_code == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = cli("serve", model_file, "--port", busy.getsockname()[1])
    assert taken.exit_code == 1
    one_error_line(taken, "cannot listen", command="serve")


def test_an_onnx_model_is_served_like_its_checkpoint(model, model_file, tmp_path):
    from fakecifar.checkpoint import export_onnx, load_checkpoint
    from fakecifar.evaluate import load_classifier

    net, meta = load_checkpoint(model_file)
    onnx_model = classifier_model(load_classifier(export_onnx(net, meta, tmp_path / "tiny.onnx")))
    x = images(6)
    with serve(onnx_model, mode="logits", port=0) as server:
        body = predict(server, x).json()
    assert body["logits"] == expected(onnx_model, x, "logits")["logits"]
    np.testing.assert_allclose(body["logits"], expected(model, x, "logits")["logits"], atol=1e-4)
