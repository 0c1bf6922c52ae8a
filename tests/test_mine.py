"""`fakecifar mine` end to end: the real CLI against a loopback server that speaks each
protocol (tests/mine_server.py) and injects the faults real services produce."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pytest

from fakecifar.mine.phash import hamming
from fakecifar.shards import Shard

from mine_server import MineServer, ServerConfig, SlidingWindow, folder_contents

# No waiting in tests: unlimited rate, 10 ms backoff base, short timeouts.
FAST = ["--rate", "0", "--backoff", "0.01", "--timeout", "5"]
SECRET = "sk-test-0123456789abcdefSECRET"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (
        "OPENAI_API_KEY",
        "HF_TOKEN",
        "A1111_API_AUTH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "FAKECIFAR_DEBUG",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs) -> MineServer:
        server = MineServer(ServerConfig(**kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def mine(cli, monkeypatch):
    """mine(server, out, *args, env={...}): `fakecifar mine` against SERVER into OUT."""

    def run(server: MineServer, out: Path, *args: str, api: str | None = None, env: dict | None = None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        return cli("mine", "--api", api or server.config.api, "--url", server.url, "-o", out, *FAST, *args)

    return run


def json_line(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


# --------------------------------------------------------------------------- happy paths


def test_craiyon_mines_exact_quota_and_prints_each_shard(mine, serve, tmp_path):
    server = serve(api="craiyon", latency=0.005)
    out = tmp_path / "raw"
    result = mine(
        server,
        out,
        "--classes",
        "cat,dog,bird",
        "--per-class",
        "12",
        "--shard-size",
        "10",
        "--prompt",
        "a photo of a {class}",
        "--prompt",
        "a drawing of a {class}",
    )
    assert result.exit_code == 0, result.stderr
    paths = result.stdout.splitlines()
    data = folder_contents(out)
    assert [Path(p) for p in paths] == sorted(data["shards"]) or sorted(map(Path, paths)) == data["shards"]
    assert all(Path(p).name.startswith("mine-main-") for p in paths)
    assert data["counts"] == {"cat": 12, "dog": 12, "bird": 12}
    assert len(set(data["sha"])) == 36
    assert set(data["sha"]) <= set(server.served)  # stored pixels are exactly what was served
    assert data["partials"] == []
    # Both templates were used, with the class name filled in, as Craiyon's {"prompt"} body.
    prompts = {b["prompt"] for b in server.bodies}
    assert "a photo of a cat" in prompts and "a drawing of a cat" in prompts
    assert all(set(b) == {"prompt"} for b in server.bodies)
    shard = Shard(paths[0])
    assert set(shard.columns) >= {"images", "labels", "prompt", "seed", "source", "sha256", "origin", "phash"}
    assert (shard.read("origin") == 1).all()
    assert (shard.read("seed") == -1).all()
    source = json.loads(shard.read("source")[0])
    assert source["api"] == "craiyon" and source["request_id"].startswith("req_") and source["time"].endswith("Z")
    for label, prompt in zip(shard.read("labels"), shard.read("prompt")):
        assert shard.classes[label] in prompt
    provenance = json.loads(shard.attrs["provenance"])
    assert provenance[-1]["step"] == "mine" and provenance[-1]["api"] == "craiyon"
    assert "done" in result.stderr and "requests" in result.stderr.replace("request(s)", "requests")


def test_rerun_resumes_and_then_has_nothing_to_do(mine, serve, tmp_path):
    server = serve(api="craiyon")
    out = tmp_path / "raw"
    first = mine(server, out, "--classes", "a,b", "--per-class", "20", "--max-requests", "2", "--concurrency", "1")
    assert first.exit_code == 0, first.stderr
    assert "--max-requests" in first.stderr and "rerun" in first.stderr
    assert server.requests == 2
    assert folder_contents(out)["n"] == 18
    second = mine(server, out, "--classes", "a,b", "--per-class", "20")
    assert second.exit_code == 0, second.stderr
    assert folder_contents(out)["counts"] == {"a": 20, "b": 20}
    before = server.requests
    third = mine(server, out, "--classes", "a,b", "--per-class", "20")
    assert third.exit_code == 0 and third.stdout == ""
    assert "nothing to do" in third.stderr
    assert server.requests == before
    # A bigger quota later continues the same folder without duplicates.
    fourth = mine(server, out, "--classes", "a,b", "--per-class", "25")
    data = folder_contents(out)
    assert fourth.exit_code == 0 and data["counts"] == {"a": 25, "b": 25} and len(set(data["sha"])) == 50


def test_max_minutes_bounds_a_run(mine, serve, tmp_path):
    server = serve(api="craiyon", latency=0.05)
    result = mine(
        server,
        tmp_path / "raw",
        "--classes",
        "a,b",
        "--per-class",
        "9000",
        "--concurrency",
        "2",
        "--max-minutes",
        "0.01",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["stop"] == "max-minutes" and summary["missing"] == 18000 - summary["images"]
    data = folder_contents(tmp_path / "raw")
    assert data["n"] == summary["images"] and data["partials"] == []  # the open shard was finished


def test_a1111_sends_parameters_and_stores_seeds_and_model(mine, serve, tmp_path):
    server = serve(api="a1111", latency=0.005)
    out = tmp_path / "sd"
    result = mine(
        server,
        out,
        "--classes",
        "cat,dog",
        "--per-class",
        "6",
        "--batch",
        "3",
        "--size",
        "16x24",
        "--steps",
        "4",
        "--cfg-scale",
        "6.5",
        "--sampler",
        "DPM++ 2M",
        "--negative-prompt",
        "blurry",
        "--seed",
        "7",
        "--model",
        "sd15.safetensors",
    )
    assert result.exit_code == 0, result.stderr
    body = server.bodies[0]
    assert body["negative_prompt"] == "blurry" and body["steps"] == 4 and body["cfg_scale"] == 6.5
    assert body["sampler_name"] == "DPM++ 2M" and body["batch_size"] == 3 and body["n_iter"] == 1
    assert (body["height"], body["width"]) == (16, 24)
    assert body["override_settings"] == {"sd_model_checkpoint": "sd15.safetensors"}
    sent_seeds = {b["seed"] for b in server.bodies}
    data = folder_contents(out)
    assert data["counts"] == {"cat": 6, "dog": 6}
    seeds, sources = [], []
    for path in data["shards"]:
        shard = Shard(path)
        assert shard.image_size == (16, 24)  # the grid image (first, wider) was not stored
        seeds += shard.read("seed").tolist()
        sources += [json.loads(s) for s in shard.read("source")]
    # Seeds come from the decoded `info` string: the request's seed and the next ones.
    assert all(any(0 <= s - base < 3 for base in sent_seeds) for s in seeds)
    assert len(set(seeds)) == 12
    assert {s["model"] for s in sources} == {"v1-5-pruned-emaonly"}
    # Same --seed, fresh folder: the same seeds are asked for.
    server2_out = tmp_path / "sd2"
    before = len(server.bodies)
    mine(
        server,
        server2_out,
        "--classes",
        "cat,dog",
        "--per-class",
        "6",
        "--batch",
        "3",
        "--size",
        "16x24",
        "--seed",
        "7",
        "--concurrency",
        "1",
    )
    assert {b["seed"] for b in server.bodies[before:]} == sent_seeds


def test_openai_key_from_env_is_sent_and_never_shown(mine, serve, tmp_path):
    server = serve(api="openai", api_key=SECRET)
    out = tmp_path / "oa"
    result = mine(
        server,
        out,
        "--classes",
        "cat,dog",
        "--per-class",
        "4",
        "--batch",
        "2",
        "--size",
        "16",
        "--json",
        "--stats",
        tmp_path / "stats.jsonl",
        env={"OPENAI_API_KEY": SECRET},
    )
    assert result.exit_code == 0, result.stderr
    assert all(a == f"Bearer {SECRET}" for a in server.auth)
    body = server.bodies[0]
    assert body == {
        "model": "dall-e-2",
        "prompt": body["prompt"],
        "n": 2,
        "size": "16x16",
        "response_format": "b64_json",
    }
    summary = json_line(result)
    assert summary["images"] == 8 and summary["requests"] == 4 and summary["stop"] == "done"
    assert summary["per_class"] == {"cat": 4, "dog": 4}
    assert json.loads((tmp_path / "stats.jsonl").read_text()) == summary
    assert SECRET not in result.stdout + result.stderr + (tmp_path / "stats.jsonl").read_text()
    for path in out.glob("*.h5"):
        assert SECRET.encode() not in path.read_bytes()


def test_openai_wrong_key_is_fatal_and_scrubbed(cli, serve, tmp_path):
    server = serve(api="openai", api_key="sk-the-right-one")
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    result = cli(
        "-q",
        "mine",
        "--api",
        "openai",
        "--url",
        server.url,
        "-o",
        tmp_path / "oa",
        *FAST,
        "--classes",
        "cat",
        "--per-class",
        "2",
        "--api-key-file",
        key_file,
        "--concurrency",
        "1",
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fakecifar mine: error: ")
    assert "refused the key" in result.stderr and "OPENAI_API_KEY" in result.stderr
    assert SECRET not in result.stderr + result.stdout  # the server echoed it; we did not
    assert server.requests == 1  # fatal at once, never retried


def test_openai_needs_a_key(mine, serve, tmp_path):
    server = serve(api="openai")
    result = mine(server, tmp_path / "oa", "--classes", "cat", "--per-class", "2")
    assert result.exit_code == 2 and "needs a key" in result.stderr and "OPENAI_API_KEY" in result.stderr
    result = mine(server, tmp_path / "oa", "--classes", "cat", "--per-class", "2", "--api-key-env", "MY_KEY")
    assert result.exit_code == 2 and "MY_KEY" in result.stderr
    assert server.requests == 0


def test_openai_insufficient_quota_stops_without_retry(mine, serve, tmp_path):
    server = serve(api="openai", faults=["quota"])
    stats = tmp_path / "stats.jsonl"
    result = mine(
        server,
        tmp_path / "oa",
        "--classes",
        "cat",
        "--per-class",
        "3",
        "--concurrency",
        "1",
        "--stats",
        stats,
        env={"OPENAI_API_KEY": SECRET},
    )
    assert result.exit_code == 1
    logged = json.loads(stats.read_text())  # a cron job's stats file records the failure too
    assert logged["stop"] == "error" and "quota" in logged["error"] and logged["failures"] == {"quota": 1}
    assert "quota" in result.stderr.splitlines()[-1] and "billing" in result.stderr.splitlines()[-1]
    assert server.requests == 1
    assert not list((tmp_path / "oa").glob("*.h5"))


def test_openai_rate_limit_is_retried_honouring_headers(mine, serve, tmp_path):
    server = serve(api="openai", faults=["429", "429-nora"], retry_after="0")
    result = mine(
        server,
        tmp_path / "oa",
        "--classes",
        "cat",
        "--per-class",
        "3",
        "--concurrency",
        "1",
        "--json",
        env={"OPENAI_API_KEY": SECRET},
    )
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["rate_limited"] == 2 and summary["failures"] == {"rate_limited": 2}
    assert summary["retries"] == 2 and summary["images"] == 3


def test_hf_waits_for_a_loading_model(mine, serve, tmp_path):
    server = serve(api="hf", faults=["loading"], api_key="hf_token_x")
    result = mine(
        server,
        tmp_path / "hf",
        "--classes",
        "cat,dog",
        "--per-class",
        "2",
        "--model",
        "org/sd-tiny",
        "--size",
        "16",
        "--steps",
        "3",
        "--negative-prompt",
        "ugly",
        "--json",
        env={"HF_TOKEN": "hf_token_x"},
    )
    assert result.exit_code == 0, result.stderr
    assert json_line(result)["failures"] == {"model_loading": 1}
    body = server.bodies[-1]
    assert body["inputs"] in ("a photo of a cat", "a photo of a dog")
    assert body["parameters"]["negative_prompt"] == "ugly" and body["parameters"]["num_inference_steps"] == 3
    assert folder_contents(tmp_path / "hf")["counts"] == {"cat": 2, "dog": 2}
    shard = Shard(next((tmp_path / "hf").glob("*.h5")))
    assert (shard.read("seed") >= 0).all()  # hf takes the client's seed
    assert json.loads(shard.read("source")[0])["model"] == "org/sd-tiny"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "fault,reason",
    [
        ("500", "http_500"),
        ("502", "http_502"),
        ("503", "http_503"),
        ("504", "http_504"),
        ("524", "http_524"),
        ("408", "http_408"),
        ("html503", "http_503"),
        ("truncated", "truncated"),
        ("reset", "connection"),
        ("429-nora", "rate_limited"),
        ("429", "rate_limited"),
    ],
)
def test_transient_faults_are_retried(mine, serve, tmp_path, fault, reason):
    server = serve(api="craiyon", faults=[fault])
    result = mine(server, tmp_path / "raw", "--classes", "cat", "--per-class", "9", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["failures"] == {reason: 1} and summary["retries"] == 1
    assert summary["images"] == 9 and summary["requests"] == 2
    assert folder_contents(tmp_path / "raw")["counts"] == {"cat": 9}


def test_slow_response_times_out_and_is_retried(cli, serve, tmp_path):
    server = serve(api="craiyon", faults=["slow"], slow_seconds=3.0)
    result = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        tmp_path / "raw",
        "--rate",
        "0",
        "--backoff",
        "0.01",
        "--timeout",
        "0.4",
        "--classes",
        "cat",
        "--per-class",
        "9",
        "--concurrency",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json_line(result)["failures"] == {"timeout": 1}


def test_cloudflare_block_is_one_clear_line(cli, serve, tmp_path):
    server = serve(api="craiyon", faults=["html403"])
    result = cli(
        "-q",
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        tmp_path / "raw",
        *FAST,
        "--classes",
        "cat",
        "--per-class",
        "9",
        "--concurrency",
        "1",
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("fakecifar mine: error: blocked by Cloudflare")
    assert "HTTP 403" in result.stderr and "Traceback" not in result.stderr
    assert server.requests == 1


def test_html_page_instead_of_json_is_a_clear_error(cli, serve, tmp_path):
    server = serve(api="a1111", faults=["html200"])
    result = cli(
        "-q",
        "mine",
        "--api",
        "a1111",
        "--url",
        server.url,
        "-o",
        tmp_path / "sd",
        *FAST,
        "--classes",
        "cat",
        "--per-class",
        "1",
    )
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "HTML page" in result.stderr and "--url" in result.stderr


def test_bad_base64_drops_that_image_only(mine, serve, tmp_path):
    server = serve(api="craiyon", faults=["badb64"])
    result = mine(server, tmp_path / "raw", "--classes", "cat", "--per-class", "9", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["bad_images"] == 1 and summary["failures"] == {"bad_image": 1}
    assert summary["requests"] == 2 and summary["images"] == 9
    data = folder_contents(tmp_path / "raw")
    assert data["counts"] == {"cat": 9} and set(data["sha"]) <= set(server.served)


@pytest.mark.parametrize("fault,reason", [("allbad", "bad_image"), ("badjson", "bad_json"), ("empty", "no_images")])
def test_unusable_answers_are_counted_not_retried(mine, serve, tmp_path, fault, reason):
    server = serve(api="craiyon", faults=[fault])
    result = mine(server, tmp_path / "raw", "--classes", "cat", "--per-class", "9", "--concurrency", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["failed_requests"] == 1 and summary["retries"] == 0 and summary["requests"] == 2
    assert summary["images"] == 9
    if reason != "no_images":  # bad images are counted one by one
        assert summary["failures"] == {reason: 9 if reason == "bad_image" else 1}


def test_response_size_is_capped(mine, serve, tmp_path):
    server = serve(api="craiyon", faults=["huge"])
    result = mine(
        server,
        tmp_path / "raw",
        "--classes",
        "cat",
        "--per-class",
        "9",
        "--concurrency",
        "1",
        "--json",
        "--max-mib",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    assert json_line(result)["failures"] == {"too_large": 1}


def test_persistent_failure_gives_up_with_exit_1(mine, serve, tmp_path):
    server = serve(api="craiyon", faults=["500"] * 100)
    result = mine(
        server,
        tmp_path / "raw",
        "--classes",
        "cat",
        "--per-class",
        "9",
        "--concurrency",
        "1",
        "--retries",
        "1",
        "--max-failures",
        "3",
    )
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("fakecifar mine: error: the last 3 requests brought no new image") and "http_500" in last
    assert server.requests == 6


def test_connection_refused_is_a_clear_failure(cli, tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    result = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        f"http://127.0.0.1:{port}",
        "-o",
        tmp_path / "raw",
        *FAST,
        "--classes",
        "cat",
        "--per-class",
        "9",
        "--concurrency",
        "1",
        "--retries",
        "1",
        "--max-failures",
        "2",
    )
    assert result.exit_code == 1
    assert "connection" in result.stderr and "Traceback" not in result.stderr


def test_server_rate_limit_slows_the_client_down(cli, serve, tmp_path):
    server = serve(api="craiyon", rate_limit=8, retry_after=None)
    result = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        tmp_path / "raw",
        "--rate",
        "200",
        "--backoff",
        "0.01",
        "--classes",
        "a,b,c",
        "--per-class",
        "45",
        "--concurrency",
        "8",
        "--json",
        "--retries",
        "8",
    )
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert summary["rate_limited"] > 0 and summary["final_rate"] < 200
    assert "slowing down" in result.stderr
    data = folder_contents(tmp_path / "raw")
    assert data["counts"] == {"a": 45, "b": 45, "c": 45} and len(set(data["sha"])) == 135


def test_strict_window_limit_counts_the_last_second_half_open():
    limit = SlidingWindow(3)
    assert [limit.take(t) for t in (100.0, 100.5, 100.9, 100.95)] == [True, True, True, False]
    assert limit.take(101.0)  # 100.0 is out of (100.0, 101.0]
    assert not limit.take(101.4) and limit.take(101.5)


def test_explicit_rate_never_trips_a_strict_window_limit(cli, serve, tmp_path):
    # Exactly 20 requests allowed in any second, 429 for the 21st: pacing at --rate 20 must
    # stay under it by itself (no 429, so the rate is never cut), 4 threads or not.
    server = serve(api="craiyon", rate_limit=20, limiter="window", images=1, size=8)
    result = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        tmp_path / "raw",
        "--rate",
        "20",
        "--concurrency",
        "4",
        "--classes",
        "a,b",
        "--per-class",
        "15",
        "--backoff",
        "0.01",
        "--timeout",
        "5",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json_line(result)
    assert server.by_status == {200: 30}
    assert summary["requests"] == 30 and summary["rate_limited"] == 0 and summary["retries"] == 0
    assert summary["final_rate"] == 20 and "slowing down" not in result.stderr
    assert folder_contents(tmp_path / "raw")["counts"] == {"a": 15, "b": 15}


def test_images_are_stored_at_native_size_one_series_per_size(mine, serve, tmp_path):
    server = serve(api="craiyon", size=16, alt_size=24)
    out = tmp_path / "raw"
    result = mine(server, out, "--classes", "a,b", "--per-class", "18", "--concurrency", "1", "--shard-size", "10")
    assert result.exit_code == 0, result.stderr
    sizes: dict[tuple[int, int], list[str]] = {}
    for path in out.glob("*.h5"):
        shard = Shard(path)
        sizes.setdefault(shard.image_size, []).append(path.name)
    assert set(sizes) == {(16, 16), (24, 24)}
    second = (24, 24) if all("-24x24-" in n for n in sizes[(24, 24)]) else (16, 16)
    assert all(f"-{second[0]}x{second[1]}-" in n for n in sizes[second])  # the later size gets its own series
    assert folder_contents(out)["counts"] == {"a": 18, "b": 18}


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_are_dropped_within_and_across_runs(mine, serve, tmp_path):
    server = serve(api="craiyon", duplicates=True, fmt="png")
    out = tmp_path / "raw"
    result = mine(server, out, "--classes", "cat,dog", "--per-class", "8", "--json", "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    assert json_line(result)["duplicates"] > 0
    data = folder_contents(out)
    assert data["counts"] == {"cat": 8, "dog": 8} and len(set(data["sha"])) == 16
    # The server starts over and serves the same images again: all known from the first run.
    server.config.duplicates = False
    server.image_counter = 0
    server.config.duplicates = True
    result = mine(server, out, "--classes", "cat,dog", "--per-class", "12", "--json", "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    data = folder_contents(out)
    assert data["counts"] == {"cat": 12, "dog": 12} and len(set(data["sha"])) == 24


def test_near_duplicates_are_dropped_with_dedup_phash(mine, serve, tmp_path):
    server = serve(api="craiyon", near_duplicates=True, fmt="png", size=32)
    out = tmp_path / "near"
    result = mine(
        server, out, "--classes", "cat", "--per-class", "12", "--dedup-phash", "6", "--json", "--concurrency", "1"
    )
    assert result.exit_code == 0, result.stderr
    assert json_line(result)["near_duplicates"] >= 6
    hashes = [int(h) for p in out.glob("*.h5") for h in h5py.File(p, "r")["phash"][:]]
    assert len(hashes) == 12
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 6
    # Without the option the near-duplicates are kept (they are not pixel-identical).
    plain = tmp_path / "plain"
    server.image_counter = 0
    result = mine(server, plain, "--classes", "cat", "--per-class", "12", "--json", "--concurrency", "1")
    assert json_line(result)["near_duplicates"] == 0 and json_line(result)["duplicates"] == 0


# --------------------------------------------------------------------------- usage errors


def test_unknown_api_is_a_usage_error(cli, tmp_path):
    result = cli("mine", "--api", "dalle-mini", "-o", tmp_path / "x", "--per-class", "1")
    assert result.exit_code == 2
    assert "unknown --api 'dalle-mini'" in result.stderr and "craiyon" in result.stderr
    assert not (tmp_path / "x").exists()


def test_prompt_without_class_needs_a_single_class(mine, serve, tmp_path):
    server = serve(api="craiyon")
    result = mine(server, tmp_path / "x", "--classes", "cat,dog", "--per-class", "1", "--prompt", "a cute animal")
    assert result.exit_code == 2 and "{class}" in result.stderr and "--classes" in result.stderr
    assert server.requests == 0
    result = mine(server, tmp_path / "y", "--classes", "cat", "--per-class", "9", "--prompt", "a cute animal")
    assert result.exit_code == 0, result.stderr
    assert {b["prompt"] for b in server.bodies} == {"a cute animal"}


def test_folder_with_other_classes_is_refused_naming_the_shard(mine, serve, tmp_path):
    server = serve(api="craiyon")
    out = tmp_path / "raw"
    assert mine(server, out, "--classes", "cat,dog", "--per-class", "9").exit_code == 0
    before = server.requests
    result = mine(server, out, "--classes", "ship,truck", "--per-class", "9")
    assert result.exit_code == 2
    shard = next(out.glob("*.h5"))
    assert str(shard) in result.stderr and "classes" in result.stderr
    assert server.requests == before


def test_damaged_h5_in_the_folder_is_refused(mine, serve, tmp_path):
    server = serve(api="craiyon")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = mine(server, out, "--classes", "cat", "--per-class", "9")
    assert result.exit_code == 2 and str(out / "broken.h5") in result.stderr


def test_unwritable_output_is_a_clear_error(mine, serve, tmp_path):
    server = serve(api="craiyon")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = mine(server, blocker / "raw", "--classes", "cat", "--per-class", "9")
    assert result.exit_code == 2 and "cannot create" in result.stderr
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            result = mine(server, ro, "--classes", "cat", "--per-class", "9")
            assert result.exit_code == 2 and "not writable" in result.stderr
        finally:
            ro.chmod(0o755)
    assert server.requests == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--per-class", "0"], "--per-class"),
        (["--per-class", "5", "--concurrency", "0"], "--concurrency"),
        (["--per-class", "5", "--rate", "-1"], "--rate"),
        (["--per-class", "5", "--worker", "../evil"], "--worker"),
        (["--per-class", "5", "--dedup-phash", "99"], "--dedup-phash"),
        (["--per-class", "5", "--model", "x"], "--model"),
        (["--per-class", "5", "--batch", "4"], "9 images"),
        (["--per-class", "5", "--url", "ftp://example.com"], "http"),
    ],
)
def test_bad_options_are_usage_errors(cli, tmp_path, args, needle):
    result = cli("mine", "--api", "craiyon", "-o", tmp_path / "x", "--classes", "cat", *args)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stderr.count("\n") == 1


def test_help_reads_like_a_manual(cli):
    result = cli("mine", "--help")
    assert result.exit_code == 0
    for needle in ("--per-class", "Retry-After", "--worker", "cron", "Exit status"):
        assert needle in result.stdout


def test_a_mined_folder_has_a_manifest_and_excludes_other_producers(mine, serve, tmp_path, cli):
    from fakecifar.manifest import OutputLock, read_manifest

    server = serve(api="craiyon", latency=0.001)
    out = tmp_path / "raw"
    result = mine(server, out, "--classes", "cat,dog", "--per-class", "9", "--shard-size", "4")
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["complete"] and manifest["growing"] and manifest["quota_met"]
    assert sorted(e["name"] for e in manifest["shards"]) == sorted(p.name for p in out.glob("*.h5"))
    assert manifest["images"] == 18 and cli("stats", out).exit_code == 0  # readable as a dataset
    with OutputLock(out, command="fakecifar import src -o raw"):  # an import is writing here
        busy = mine(server, out, "--classes", "cat,dog", "--per-class", "20")
    assert busy.exit_code == 1 and "is being written by pid" in busy.stderr and "fakecifar import" in busy.stderr
    after = read_manifest(out)
    assert after is not None and after["images"] == 18


def test_a_full_disk_ends_mining_with_one_line_and_keeps_finished_shards(mine, serve, tmpfs_dir):
    from fakecifar.manifest import read_manifest
    from fakecifar.shards import Shard

    disk = tmpfs_dir("400k")
    server = serve(api="craiyon", latency=0.001)
    out = disk / "raw"
    result = mine(server, out, "--classes", "cat,dog", "--per-class", "400", "--shard-size", "9")
    assert result.exit_code == 1, result.stderr
    assert "no space left on device writing" in result.stderr.strip().splitlines()[-1]
    assert not list(disk.rglob("*.h5.partial"))
    finished = sorted(out.glob("*.h5"))
    manifest = read_manifest(out)
    assert manifest is not None and sorted(e["name"] for e in manifest["shards"]) == [p.name for p in finished]
    for path in finished:
        Shard(path)  # every finished shard is whole
