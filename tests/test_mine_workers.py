"""`fakecifar mine` as separate processes: kill -9 in the middle then resume, SIGTERM,
the per-worker lock, and several workers filling one quota in one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakecifar.shards import Shard

from mine_server import MineServer, ServerConfig, folder_contents

FAST = ["--rate", "0", "--backoff", "0.01", "--timeout", "10"]


@pytest.fixture
def server():
    srv = MineServer(ServerConfig(api="craiyon", latency=0.1)).start()
    yield srv
    srv.stop()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("FAKECIFAR_DEBUG", None)
    return env


def spawn(server: MineServer, out: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fakecifar",
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        str(out),
        *FAST,
        *args,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def wait_for(condition, proc: subprocess.Popen, what: str, limit: float = 60.0) -> None:
    """Poll until `condition()` (not a timing assertion: the limit only stops a hung test)."""
    end = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(f"miner exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.005)


def assert_clean(out: Path, per_class: dict) -> dict:
    data = folder_contents(out)  # opens and checks every shard
    assert data["counts"] == per_class
    assert len(set(data["sha"])) == len(data["sha"]) == sum(per_class.values())
    assert data["partials"] == []
    return data


def test_kill_9_mid_run_then_rerun_gives_exact_counts(cli, server, tmp_path):
    out = tmp_path / "raw"
    proc = spawn(server, out, "--classes", "a,b,c", "--per-class", "45", "--shard-size", "7", "--concurrency", "2")
    wait_for(lambda: list(out.glob("*.h5")) and list(out.glob("*.h5.partial")), proc, "a shard and a partial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob("*.h5.partial")), "the kill left no half-written shard to test with"
    for path in out.glob("*.h5"):
        Shard(path)  # every finished shard opens: the partial never took a real name
    assert proc.stdout is not None
    printed = proc.stdout.read().split()
    assert all(Path(p).exists() for p in printed)

    result = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        out,
        *FAST,
        "--classes",
        "a,b,c",
        "--per-class",
        "45",
        "--shard-size",
        "7",
    )
    assert result.exit_code == 0, result.stderr
    assert "unfinished shard" in result.stderr
    assert_clean(out, {"a": 45, "b": 45, "c": 45})


def test_sigterm_finishes_the_open_shard(server, tmp_path):
    out = tmp_path / "raw"
    proc = spawn(
        server, out, "--classes", "a,b", "--per-class", "900", "--shard-size", "1000", "--concurrency", "2", "--json"
    )
    wait_for(lambda: list(out.glob("*.h5.partial")), proc, "a partial shard")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["stop"] == "interrupted" and summary["images"] > 0
    data = folder_contents(out)
    assert data["partials"] == [] and data["n"] == summary["images"]  # nothing fetched was lost
    assert [str(p) for p in data["shards"]] == summary["shards"]


def test_second_run_on_a_locked_folder_exits_at_once(cli, server, tmp_path):
    out = tmp_path / "raw"
    server.config.latency = 0.3
    proc = spawn(server, out, "--classes", "a,b", "--per-class", "45", "--concurrency", "1", "--shard-size", "9")
    lock = out / ".mine-worker-main.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip(), proc, "the lock")
    before = server.requests
    result = cli(
        "mine", "--api", "craiyon", "--url", server.url, "-o", out, *FAST, "--classes", "a,b", "--per-class", "45"
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "already being mined by worker 'main'" in result.stderr and f"pid {proc.pid}" in result.stderr
    assert "--worker" in result.stderr
    assert server.requests - before <= 1  # (the first miner's own requests go on)

    # A second worker id runs beside it and the two fill the quota exactly.
    helper = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        out,
        *FAST,
        "--classes",
        "a,b",
        "--per-class",
        "45",
        "--worker",
        "w2",
        "--concurrency",
        "2",
        "--shard-size",
        "9",
    )
    assert helper.exit_code == 0, helper.stderr
    assert all(Path(p).name.startswith("mine-w2-") for p in helper.stdout.split())
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert_clean(out, {"a": 45, "b": 45})


def test_concurrent_workers_share_one_quota(cli, server, tmp_path):
    out = tmp_path / "raw"
    server.config.latency = 0.02
    procs = [
        spawn(
            server,
            out,
            "--classes",
            "a,b,c",
            "--per-class",
            "60",
            "--concurrency",
            "3",
            "--worker",
            w,
            "--shard-size",
            "10",
        )
        for w in ("w1", "w2", "w3")
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
    printed = [line for stdout, _ in results for line in stdout.split()]
    assert len(printed) == len(set(printed))  # distinct shard names
    data = assert_clean(out, {"a": 60, "b": 60, "c": 60})
    assert sorted(map(str, data["shards"])) == sorted(printed)
    # Exact quota with 9 images per call needs surplus drops, never an overshoot.
    rerun = cli(
        "mine",
        "--api",
        "craiyon",
        "--url",
        server.url,
        "-o",
        out,
        *FAST,
        "--classes",
        "a,b,c",
        "--per-class",
        "60",
        "--worker",
        "w1",
    )
    assert rerun.exit_code == 0 and "nothing to do" in rerun.stderr
