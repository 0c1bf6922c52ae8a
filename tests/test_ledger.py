"""The query ledger: metered at the call, cached, a hard budget, exact under kill -9 and resume,
and equal to the server's own count (against the docs/serve.md server of test_teachers.py)."""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from teacher_server import MODES, Models, ProtocolServer, build_models, images, same_answers, serving

from fakecifar.answers import Answers
from fakecifar.checkpoint import load_checkpoint, save_checkpoint
from fakecifar.errors import UsageError
from fakecifar.ledger import (
    LedgerError,
    LedgerMismatchError,
    QueryLedger,
    choose_subset,
    ledger_path,
    parse_budget,
)
from fakecifar.manifest import OutputBusyError
from fakecifar.models import build_model
from fakecifar.teachers import NO_METER, BudgetExhausted, Meter, Teacher, concat_answers, open_teacher


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("ledger"))


@pytest.fixture
def serve(models: Models) -> Iterator[Callable[..., ProtocolServer]]:
    yield from serving(models)


class Counting(Teacher):
    """A real teacher that counts the images it is sent (and can fail on demand)."""

    def __init__(self, inner: Teacher):
        super().__init__(inner.name, inner.classes, inner.input_size, inner.mode, inner.max_batch)
        self.inner = inner
        self.kind, self.white_box = inner.kind, inner.white_box
        self.calls = 0
        self.images = 0
        self.fail: BaseException | None = None

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def send(self, images: np.ndarray, meter: Meter = NO_METER) -> Answers:
        self.calls += 1
        self.images += len(images)
        if self.fail is not None:
            meter.before_attempt(self, len(images))
            raise self.fail
        return self.inner.send(images, meter)


def teacher(models: Models, mode: str = "probs", batch_size: int = 256) -> Counting:
    return Counting(open_teacher(models.pt, mode=mode, device="cpu", batch_size=batch_size))


def counts(ledger: QueryLedger) -> dict[str, int]:
    s = ledger.summary()
    keys = ("queries", "unique", "repeated", "lost", "pending", "cache_hits", "sent", "interrupted")
    return {k: s[k] for k in (*keys, "requests", "failed_requests")}


# ----------------------------------------------------------------------------- cache and counting


@pytest.mark.parametrize("mode", MODES)
def test_cache_answers_exactly_and_hits_are_free(models: Models, tmp_path: Path, mode: str) -> None:
    t = teacher(models, mode)
    x = images(6)
    with QueryLedger(tmp_path / "s.pt.queries") as ledger:
        first = ledger.ask(t, x)
        same_answers(first, t.inner.query(x))
        again = ledger.ask(t, x[::-1].copy())  # cached, in another order
        same_answers(again, Answers(first.mode, first.labels[::-1], *_rev(first)))
        assert t.calls == 1 and t.images == 6
        c = counts(ledger)
    assert c["queries"] == 6 == c["unique"] and c["cache_hits"] == 6 and c["requests"] == 1


def _rev(a: Answers) -> tuple[np.ndarray | None, np.ndarray | None]:
    return (
        None if a.log_probs is None else a.log_probs[::-1],
        None if a.logits is None else a.logits[::-1],
    )


def test_duplicates_in_a_batch_are_sent_once(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    a, b = images(2)
    batch = np.stack([a, b, a, a, b])
    with QueryLedger(tmp_path / "l.queries") as ledger:
        got = ledger.ask(t, batch)
        assert t.images == 2
        np.testing.assert_array_equal(got.log_probs[2], got.log_probs[0])  # type: ignore[index]
        c = counts(ledger)
    assert c["queries"] == 2 == c["unique"] and c["cache_hits"] == 3 and c["sent"] == 2


def test_without_the_cache_repeats_are_sent_and_counted(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    x = images(4)
    with QueryLedger(tmp_path / "l.queries", cache=False) as ledger:
        ledger.ask(t, x)
        ledger.ask(t, np.concatenate([x[:2], x[:1]]))
        c = counts(ledger)
    assert t.images == 7
    assert c["queries"] == 7 and c["unique"] == 4 and c["repeated"] == 3 and c["cache_hits"] == 0


def test_modes_are_counted_and_cached_apart(models: Models, tmp_path: Path) -> None:
    probs, label = teacher(models, "probs"), teacher(models, "label")
    x = images(3)
    with QueryLedger(tmp_path / "l.queries") as ledger:
        ledger.ask(probs, x)
        ledger.ask(label, x)  # same teacher, another mode: not answered yet in this mode
        ledger.ask(label, x)
        s = ledger.summary()
    assert s["by_mode"]["probs"]["queries"] == 3 and s["by_mode"]["label"]["queries"] == 3
    assert s["by_mode"]["label"]["cache_hits"] == 3 and s["queries"] == 6
    assert "by mode: label 3, probs 3" in "\n".join(QueryLedger(tmp_path / "l.queries").report_lines())


def test_an_empty_batch(models: Models, tmp_path: Path) -> None:
    t = teacher(models, "topk:2")
    with QueryLedger(tmp_path / "l.queries") as ledger:
        got = ledger.ask(t, np.zeros((0, 3, 16, 16), np.float32))
        assert len(got) == 0 and got.log_probs is not None and got.log_probs.shape == (0, 4)
        assert t.calls == 0 and counts(ledger)["requests"] == 0


def test_torch_tensors_and_chunks(models: Models, tmp_path: Path) -> None:
    import torch

    t = teacher(models, batch_size=4)
    x = images(10)
    with QueryLedger(tmp_path / "l.queries") as ledger:
        got = ledger.ask(t, torch.from_numpy(x))
        assert t.calls == 3 and ledger.summary()["requests"] == 3
    same_answers(got, t.inner.query(x))


# ----------------------------------------------------------------------------- the budget


def test_budget_is_exact_and_never_exceeded(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    with QueryLedger(tmp_path / "l.queries", budget=10) as ledger:
        ledger.ask(t, images(6, seed=1))
        assert ledger.remaining == 4
        ledger.ask(t, images(4, seed=2))  # exactly to the budget
        assert ledger.remaining == 0 and ledger.spent == 10
        sent = t.images
        with pytest.raises(BudgetExhausted) as info:
            ledger.ask(t, images(1, seed=3))
        assert info.value.source == "ledger" and info.value.budget == 10 and info.value.needed == 1
        assert info.value.exit_code == 1 and "--queries 10" in str(info.value)
        mixed = np.concatenate([images(2, seed=1), images(1, seed=4)])  # 2 cached, 1 new
        with pytest.raises(BudgetExhausted):
            ledger.ask(t, mixed)
        assert t.images == sent, "nothing of a refused batch is sent"
        ledger.ask(t, images(6, seed=1))  # all cached: free, so allowed at 0 remaining
        c = counts(ledger)
    assert c["queries"] == 10 and c["cache_hits"] == 6 and t.images == 10


def test_budget_zero_and_bad_budgets(models: Models, tmp_path: Path) -> None:
    with QueryLedger(tmp_path / "l.queries", budget=0) as ledger, pytest.raises(BudgetExhausted):
        ledger.ask(teacher(models), images(1))
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError):
            QueryLedger(tmp_path / "m.queries", budget=bad)  # type: ignore[arg-type]
    assert parse_budget("5k") == 5000 and parse_budget("1.5m") == 1_500_000 and parse_budget("12") == 12
    assert parse_budget(None) is None
    with pytest.raises(UsageError):
        parse_budget("lots")


def test_budget_is_kept_on_reopen_and_can_be_raised(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "l.queries"
    with QueryLedger(path, budget=5) as ledger:
        ledger.ask(teacher(models), images(5))
    with QueryLedger(path) as ledger:
        assert ledger.budget == 5 and ledger.remaining == 0
        with pytest.raises(BudgetExhausted):
            ledger.ask(teacher(models), images(1, seed=9))
    with QueryLedger(path, budget=8) as ledger:
        ledger.ask(teacher(models), images(3, seed=9))
        assert ledger.remaining == 0


def test_choose_subset_is_seeded_and_reported(models: Models, tmp_path: Path) -> None:
    a = choose_subset(1000, 100, seed=3)
    assert len(a) == 100 == len(set(a.tolist())) and (np.diff(a) > 0).all() and a.max() < 1000
    np.testing.assert_array_equal(a, choose_subset(1000, 100, seed=3))
    assert not np.array_equal(a, choose_subset(1000, 100, seed=4))
    np.testing.assert_array_equal(choose_subset(50, 100, seed=0), np.arange(50))
    np.testing.assert_array_equal(choose_subset(50, None, seed=0), np.arange(50))
    with QueryLedger(tmp_path / "l.queries", budget=100) as ledger:
        ledger.note_subset(1000, 100, seed=3)
        lines = ledger.report_lines()
        assert ledger.summary()["subset"] == {"available": 1000, "queried": 100, "seed": 3}
    assert any("seeded random subset" in line and "100 of the 1,000" in line for line in lines), lines


# ----------------------------------------------------------------------------- persistence


def test_reopen_gives_the_same_counters_and_the_summary_goes_in_a_checkpoint(models: Models, tmp_path: Path) -> None:
    path = ledger_path(tmp_path / "student.pt")
    assert path.name == "student.pt.queries"
    t = teacher(models)
    with QueryLedger(path, budget=100) as ledger:
        ledger.ask(t, images(5))
        ledger.ask(t, images(5))
        before = ledger.summary()
    with QueryLedger(path, teacher=t) as ledger:
        after = ledger.summary()
        ledger.ask(t, images(5))
        assert t.calls == 1
    assert {k: v for k, v in after.items() if k != "session"} == {k: v for k, v in before.items() if k != "session"}
    assert after["session"] == {"queries": 0, "cache_hits": 0, "requests": 0}
    student = save_checkpoint(
        tmp_path / "student.pt",
        build_model("lenet5", 4),
        arch="lenet5",
        classes=t.classes,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        input_size=32,
        train={"queries": after},
    )
    _, meta = load_checkpoint(student)
    assert meta["train"]["queries"] == json.loads(json.dumps(after))


def test_another_teacher_is_refused(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "l.queries"
    with QueryLedger(path) as ledger:
        ledger.ask(teacher(models), images(2))
    moved = tmp_path / "elsewhere" / "victim.pt"
    moved.parent.mkdir()
    shutil.copy(models.pt, moved)
    with QueryLedger(path, teacher=open_teacher(moved, device="cpu")) as ledger:  # the same file, moved
        assert ledger.summary()["queries"] == 2
    other = open_teacher(models.onnx)
    with pytest.raises(LedgerMismatchError) as info:
        QueryLedger(path, teacher=other)
    assert str(path) in str(info.value) and "belongs to a torch teacher" in str(info.value)
    assert info.value.exit_code == 2
    with QueryLedger(path) as ledger, pytest.raises(LedgerMismatchError):
        ledger.ask(other, images(1))


def test_not_a_ledger_and_busy(models: Models, tmp_path: Path) -> None:
    junk = tmp_path / "junk.queries"
    junk.write_bytes(b"\x00garbage" * 300)
    with pytest.raises(LedgerError) as info:
        QueryLedger(junk)
    assert str(junk) in str(info.value) and info.value.exit_code == 2
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(LedgerError, match="not a fakecifar query ledger"):
        QueryLedger(other)
    empty = tmp_path / "empty.queries"  # a creation cut short leaves an empty file: a new ledger
    empty.touch()
    QueryLedger(empty).close()
    path = tmp_path / "l.queries"
    with QueryLedger(path):
        with pytest.raises(OutputBusyError) as busy:
            QueryLedger(path)
        assert busy.value.exit_code == 1
    QueryLedger(path).close()  # free again once closed


def test_an_interrupt_inside_a_call_is_recorded(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    path = tmp_path / "l.queries"
    with QueryLedger(path) as ledger:
        ledger.ask(t, images(3))
        t.fail = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            ledger.ask(t, images(2, seed=1))
        c = counts(ledger)
    assert c["queries"] == 3 and c["interrupted"] == 2 and c["failed_requests"] == 1
    with QueryLedger(path) as ledger:  # nothing left in flight
        assert counts(ledger) == c


# ----------------------------------------------------------------------------- kill -9

KILLER = """
import os, signal, sys
import numpy as np
from fakecifar.ledger import QueryLedger
from fakecifar.teachers import open_teacher

spec, path, data, kill_at, budget = sys.argv[1:6]
teacher = open_teacher(spec, mode="probs", device="cpu", retries=1, backoff=0.01)
real = teacher.send
calls = [0]

def send(images, meter):
    calls[0] += 1
    answers = real(images, meter)  # the teacher has answered (a server has charged) ...
    if calls[0] == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)  # ... and the run dies before the ledger records it
    return answers

teacher.send = send
x = np.load(data)
with QueryLedger(path, budget=int(budget) if budget != "-" else None, teacher=teacher) as ledger:
    for i in range(0, len(x), 4):
        ledger.ask(teacher, x[i : i + 4])
"""


def run_killer(tmp_path: Path, spec: str, ledger: Path, x: np.ndarray, kill_at: int, budget: int | None) -> int:
    data = tmp_path / "x.npy"
    np.save(data, x)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run(
        [sys.executable, str(script), spec, str(ledger), str(data), str(kill_at), str(budget or "-")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode


def rerun(ledger: QueryLedger, t: Teacher, x: np.ndarray) -> Answers:
    parts = [ledger.ask(t, x[i : i + 4]) for i in range(0, len(x), 4)]
    return concat_answers(parts, t.mode, t.num_classes)


def test_kill_9_with_a_local_teacher(models: Models, tmp_path: Path) -> None:
    x = images(20)
    path = tmp_path / "student.pt.queries"
    assert run_killer(tmp_path, str(models.pt), path, x, kill_at=3, budget=20) == -signal.SIGKILL
    t = teacher(models)
    with QueryLedger(path, teacher=t) as ledger:
        c = counts(ledger)
        # Two batches were recorded; the third was in flight: nothing charged, nothing cached.
        assert c["queries"] == 8 == c["unique"] and c["interrupted"] == 4 and c["pending"] == 0
        assert c["requests"] == 3 and c["failed_requests"] == 1 and ledger.remaining == 12
        got = rerun(ledger, t, x)
        assert t.images == 12, "the 8 images answered before the kill are not sent again"
        c = counts(ledger)
    assert c["queries"] == 20 == c["unique"] and c["interrupted"] == 4 and c["repeated"] == 0
    same_answers(got, t.inner.query(x))


def test_kill_9_with_a_remote_teacher_agrees_with_the_server(
    serve: Any, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv: ProtocolServer = serve(mode="probs")
    x = images(20)
    path = tmp_path / "student.pt.queries"
    assert run_killer(tmp_path, srv.url, path, x, kill_at=3, budget=24) == -signal.SIGKILL
    assert srv.charged() == 12  # three batches answered; the run recorded two

    remote = open_teacher(srv.url, retries=1, backoff=0.01)
    real_account = remote.account
    monkeypatch.setattr(remote, "account", lambda: None)  # the server cannot say at first ...
    with QueryLedger(path, teacher=remote) as ledger:
        c = counts(ledger)
        assert c["queries"] == 8 and c["pending"] == 4 and ledger.remaining == 12  # ... so 4 stay pending
    monkeypatch.setattr(remote, "account", real_account)
    with QueryLedger(path, teacher=remote) as ledger:
        s = ledger.summary()
        assert s["queries"] == 12 == srv.charged() - s["server"]["base"] and s["lost"] == 4 and s["pending"] == 0
        got = rerun(ledger, remote, x)
        s = ledger.summary()
    assert srv.charged() == 24 == s["queries"] and s["unique"] == 20 and s["lost"] == 4
    assert s["server"] == {"base": 0, "seen": 24, "charged": 24, "foreign": 0, "discrepancy": 0}
    assert s["remaining"] == 0  # the lost batch was paid for: the budget counted it
    same_answers(got, open_teacher(models.pt, mode="probs", device="cpu").query(x))
    # Only the batch in flight at the kill was paid twice; everything answered before it, once.
    times = collections.Counter(srv.received)
    keys = [hashlib.sha256(img.tobytes()).hexdigest() for img in x]
    assert [times[k] for k in keys] == [1] * 8 + [2] * 4 + [1] * 8


def test_pending_charges_resolve_at_the_next_answer(serve: Any, tmp_path: Path, monkeypatch: Any) -> None:
    srv: ProtocolServer = serve(mode="probs")
    x = images(12)
    path = tmp_path / "l.queries"
    assert run_killer(tmp_path, srv.url, path, x, kill_at=2, budget=None) == -signal.SIGKILL
    remote = open_teacher(srv.url, retries=1, backoff=0.01)
    monkeypatch.setattr(remote, "account", lambda: None)
    with QueryLedger(path, teacher=remote) as ledger:
        assert counts(ledger)["pending"] == 4
        ledger.ask(remote, images(2, seed=5))  # its 200 carries the account: settles the pending 4
        s = ledger.summary()
    assert s["pending"] == 0 and s["lost"] == 4 and s["queries"] == srv.charged() == 10


# ----------------------------------------------------------------------------- against fakecifar serve


def test_end_to_end_the_servers_count_and_the_ledger_agree(
    real_serve: Any, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fakecifar serve with a key, a budget and a rate limit; a run that repeats images, is
    killed (-9) mid-run and resumed: the server's count equals the ledger's at every step, and
    no image answered before the kill is paid for again."""
    from fakecifar.serve import parse_keys

    secret = "sk-e2e-7f3a9c"
    server = real_serve(mode="probs:2", keys=parse_keys(f"{secret} 40\n"), rate=40.0, max_batch=8)
    monkeypatch.setenv("FC_KEY", secret)
    x = images(20, seed=11)
    path = tmp_path / "student.pt.queries"

    def charged() -> int:
        return int(server.accounts()["key 1"]["images"])

    script = (tmp_path / "k.py").as_posix()
    (tmp_path / "k.py").write_text(KILLER.replace('mode="probs"', 'mode="probs:2", api_key_env="FC_KEY"'))
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, script, server.url, str(path), str(tmp_path / "x.npy"), "3", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert charged() == 12  # three batches of 4 answered, two of them recorded

    remote = open_teacher(server.url, mode="probs:2", api_key_env="FC_KEY", retries=8, backoff=0.05)
    with QueryLedger(path, teacher=remote) as ledger:  # reopen: the server's account settles the kill
        s = ledger.summary()
        assert s["queries"] == 12 == charged() and s["lost"] == 4 and s["pending"] == 0
        assert s["budget"] == 30 and ledger.remaining == 18
        for i in range(0, 20, 4):  # resume: only what was not recorded is sent
            ledger.ask(remote, x[i : i + 4])
            assert ledger.summary()["queries"] == charged()
        assert charged() == 24
        again = ledger.ask(remote, np.concatenate([x[:6], x[:2]]))  # all cached: free
        assert charged() == 24
        with pytest.raises(BudgetExhausted) as info:  # 6 + 24 = 30 is the budget; 7 would exceed it
            ledger.ask(remote, images(7, seed=12))
        assert info.value.source == "ledger" and charged() == 24
        ledger.ask(remote, images(6, seed=12))
        s = ledger.summary()
        lines = ledger.report_lines()
    assert s["queries"] == 30 == charged() == s["budget"] and s["remaining"] == 0
    assert s["unique"] == 26 and s["lost"] == 4 and s["cache_hits"] == 8 + 8  # the 8 recorded, then 8 again
    assert s["server"]["charged"] == 30 and s["server"]["foreign"] == 0 and s["server"]["discrepancy"] == 0
    assert any("server: charged 30 images" in line for line in lines), lines
    same_answers(again, open_teacher(models.pt, mode="probs:2", device="cpu").query(np.concatenate([x[:6], x[:2]])))
    assert secret not in json.dumps(s) and secret not in "\n".join(lines)


def test_end_to_end_the_servers_budget_stops_the_run_exactly(real_serve: Any, tmp_path: Path) -> None:
    server = real_serve(mode="label", budget=10)
    remote = open_teacher(server.url, retries=2, backoff=0.01)
    with QueryLedger(tmp_path / "l.queries", teacher=remote) as ledger:
        ledger.ask(remote, images(8))
        with pytest.raises(BudgetExhausted) as info:
            ledger.ask(remote, images(4, seed=1))
        assert info.value.source == "server" and server.url in str(info.value)
        s = ledger.summary()
    assert s["queries"] == 8 == server.accounts()["anonymous"]["images"] and s["failed_requests"] == 1


# ----------------------------------------------------------------------------- white-box charges


def test_a_charge_counts_exactly_and_shows_in_the_report(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    with QueryLedger(tmp_path / "l.queries", budget=100) as ledger:
        ledger.charge(t, 5)
        ledger.charge(t, 3)
        ledger.charge(t, 0)  # nothing to count, nothing written
        assert t.calls == 0, "a charge sends nothing: the caller forwards the images itself"
        ledger.ask(t, images(4))
        s = ledger.summary()
        lines = ledger.report_lines()
    assert s["queries"] == 12 == s["unique"] and s["sent"] == 12 and s["requests"] == 3 and s["cache_hits"] == 0
    assert s["remaining"] == 88 and s["cached_answers"] == 4  # a charge caches nothing
    assert s["charged"] == {"white-box": 8}
    zero = dict.fromkeys(s["by_mode"]["probs"], 0)
    assert s["by_mode"]["white-box"] == {**zero, "queries": 8, "unique": 8, "sent": 8}
    assert s["by_mode"]["probs"]["queries"] == 4
    text = "\n".join(lines)
    assert "queries: 12 of 100 (88 left): 12 unique" in text, text
    assert "by mode: probs 4, white-box 8" in text, text
    assert "white-box: 8 images forwarded through the teacher by the run itself" in text, text


def test_a_charge_beyond_the_budget_is_refused_and_counts_nothing(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    path = tmp_path / "l.queries"
    with QueryLedger(path, budget=10) as ledger:
        ledger.ask(t, images(4))
        ledger.charge(t, 5)
        before = ledger.summary()
        with pytest.raises(BudgetExhausted) as info:
            ledger.charge(t, 2)  # 4 + 5 + 2 > 10
        assert info.value.source == "ledger" and info.value.budget == 10
        assert info.value.spent == 9 and info.value.needed == 2 and "--queries 10" in str(info.value)
        assert ledger.summary() == before and ledger.remaining == 1
        ledger.charge(t, 1)  # exactly to the budget
        assert ledger.remaining == 0
        with pytest.raises(BudgetExhausted):
            ledger.ask(t, images(1, seed=1))  # the charges count against what `ask` may send
        ledger.ask(t, images(4))  # cached: free
        c = counts(ledger)
    assert c["queries"] == 10 and t.images == 4
    with QueryLedger(path) as ledger, pytest.raises(BudgetExhausted):
        ledger.charge(t, 1)


def test_charge_refuses_bad_arguments_and_remote_teachers(serve: Any, models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    with QueryLedger(tmp_path / "l.queries") as ledger:
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(UsageError):
                ledger.charge(t, bad)  # type: ignore[arg-type]
        for kind in ("probs", "topk:2", "label", ""):  # an output mode's counters are ask's
            with pytest.raises(UsageError):
                ledger.charge(t, 1, kind=kind)
        ledger.charge(t, np.int64(2), kind="white-box:zskt")
        assert ledger.summary()["charged"] == {"white-box:zskt": 2}
    srv: ProtocolServer = serve(mode="probs")
    remote = open_teacher(srv.url, retries=1, backoff=0.01)
    with QueryLedger(tmp_path / "r.queries", teacher=remote) as ledger:
        with pytest.raises(UsageError, match="remote"):
            ledger.charge(remote, 1)
        assert ledger.summary()["queries"] == 0


CHARGER = """
import os, signal, sys
from fakecifar.ledger import QueryLedger
from fakecifar.teachers import open_teacher

spec, path = sys.argv[1:3]
teacher = open_teacher(spec, mode="probs", device="cpu")
ledger = QueryLedger(path, budget=20, teacher=teacher)
ledger.charge(teacher, 7)
ledger.charge(teacher, 6)
os.kill(os.getpid(), signal.SIGKILL)  # killed in the forward pass that follows the charge
"""


def test_charges_survive_reopen_and_kill_9(models: Models, tmp_path: Path) -> None:
    t = teacher(models)
    path = tmp_path / "student.pt.queries"
    script = tmp_path / "charger.py"
    script.write_text(CHARGER)
    proc = subprocess.run([sys.executable, str(script), str(models.pt), str(path)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with QueryLedger(path, teacher=t) as ledger:
        s = ledger.summary()
        assert s["queries"] == 13 == s["unique"] and s["charged"] == {"white-box": 13}
        assert s["interrupted"] == 0 and s["pending"] == 0 and ledger.remaining == 7
        ledger.charge(t, 7)
        assert ledger.summary()["session"] == {"queries": 7, "cache_hits": 0, "requests": 1}
    with QueryLedger(path) as ledger:
        s = ledger.summary()
        assert s["queries"] == 20 and s["remaining"] == 0 and s["requests"] == 3
        assert any(line.startswith("white-box: 20 images") for line in ledger.report_lines())
    assert sorted(p.name for p in tmp_path.glob("student.pt.queries*")) == ["student.pt.queries"]


# ----------------------------------------------------------------------------- cost per call


def test_a_call_is_two_commits_and_the_cache_off_looks_nothing_up(models: Models, tmp_path: Path) -> None:
    import torch

    t = teacher(models)
    for cache in (True, False):
        with QueryLedger(tmp_path / f"{cache}.queries", cache=cache) as ledger:
            ledger.ask(t, images(2, seed=9))  # binds the teacher
            generated = torch.from_numpy(images(6)).requires_grad_(True)  # as a generator makes them
            statements: list[str] = []
            ledger.conn.set_trace_callback(statements.append)
            ledger.ask(t, generated)  # one call of fresh images: the intent, then the outcome
            ledger.conn.set_trace_callback(None)
            assert [s for s in statements if s == "COMMIT"] == ["COMMIT", "COMMIT"], statements
            selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
            assert len(selects) == (1 if cache else 0), selects
            assert counts(ledger)["unique"] == 8
