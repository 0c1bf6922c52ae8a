"""The query ledger: every query a run sends to a teacher, metered where the teacher is called.

    from fakecifar.ledger import QueryLedger, ledger_path, choose_subset
    with QueryLedger(ledger_path("student.pt"), budget=5000) as ledger:   # student.pt.queries
        answers = ledger.ask(teacher, images)      # cache first, then only the misses are sent
        ledger.charge(teacher, len(x))             # white-box: the run forwards x itself
        ledger.summary()                           # dict for the checkpoint's metadata
        ledger.report_lines()                      # what distill prints at the end

One SQLite file (stdlib sqlite3) beside the student checkpoint, in WAL mode with
synchronous=FULL: a commit is one append to the write-ahead log and one fsync of it, atomic and
durable across a kill -9 and a power loss alike (a rollback journal gives the same guarantees
at several fsyncs a commit: ~20 ms against ~4 ms on the bench machine). The run holds the file
alone (a file lock; SQLite's lock in exclusive mode, so no -shm file). While it is open, and
after a kill, the last committed transactions may sit in `NAME-wal` beside it: opening the
ledger folds them into the file (and a clean close leaves the one file), so keep the two
together until then: the file moved alone after a kill lacks its last transactions. It holds

- the answer cache: the answer to each image, keyed by (sha256 of its exact float32 bytes,
  output mode), so a resumed or re-run job never pays twice for an answered image;
- counters per output mode (and per kind of `charge`): `queries` (images the teacher
  charged: what the budget limits and what the server counts), split into `unique` (answered
  for the first time), `repeated` (answered again: the cache was off) and `lost` (charged, but
  no usable answer came back); `pending` (images whose charge is not known yet: counted
  against the budget until it is), `cache_hits` (answered from the cache or by a duplicate in
  the same batch: free), `sent` (images in every request made, failed ones included),
  `interrupted` (local teachers: images in a forward pass that a kill cut short: not
  charged); and `requests`, `failed_requests`;
- for a remote teacher, the server's account: `base` (its count when the ledger was created),
  `seen` (its last figure), `foreign` (images the server charged that this ledger did not
  send: another client on the same key) and `discrepancy` (images the ledger counted that the
  server's figures do not show);
- one `inflight` row per teacher call, written (and committed) before each attempt with the
  images that call may have been charged so far (the first attempt creates it; an attempt
  known to be free is taken off again), deleted in the transaction that records the outcome;
- the `late` pending images: of attempts the server may still charge (the client timed out
  while it computed), each with the time after which a figure that does not show them
  charged makes them free (fakecifar.teachers, `charge_window`).

Exactness. Every teacher call is one transaction after the answer (answers, counters, the
inflight row removed), after a committed intent before each attempt: two commits for a call
answered at its first attempt. A kill -9 therefore leaves the state of the last finished call
plus, at most, one inflight row. On reopen that
row is resolved: for a local teacher its images are `interrupted` (nothing left the process;
no answer reached the run; nothing is charged); for a remote one they become (late) `pending`
and the server's account is asked (`GET /v1/usage`): what it charged beyond the ledger's last
figure (up to the inflight images) is `lost`, the rest was not charged (or, within the
window, not yet). When the server cannot be asked, the images stay pending (the budget counts
them) until the next figure, which every `200` carries. So, when no other client spends on
the same key, `queries + pending` bounds the server's count and `queries` equals it as soon
as nothing is pending; and nothing answered before a kill is ever paid for again.

The budget is hard: before anything is sent, `queries + pending + images to send <= budget`
must hold, and again before every retry (an attempt whose charge is unknown counts as
charged until the server says otherwise), else BudgetExhausted and nothing more is sent.

White-box metering. A method that forwards generated images through a local torch teacher
with gradients (data-free distillation: DAFL, ZSKT, DFAD) cannot take answers from the cache,
and makes the forward pass itself: it calls `charge(teacher, n)` before each forward. The
budget is checked first (BudgetExhausted, nothing counted); then the `n` images are counted
as queries, unique and sent, with one request, under the mode key "white-box" (`kind`), in one
committed transaction: a charge has happened or not, across a kill too (a kill between the
charge and the forward counts images that were not forwarded: the budget's side). The report
shows them on a line of their own (`summary()["charged"]`, and in `by_mode`); they count
towards `queries` and the budget like answered images. Black-box methods on generated images
(float32 tensors, never repeated) ask through `ask` as usual; with `cache=False` nothing is
looked up before or after the call (the answers are still stored, repeats still counted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .answers import Answers, OutputMode, parse_mode
from .errors import FakecifarError, NoSpaceError, OutputError, UsageError
from .manifest import OutputBusyError
from .outputs import utc_now
from .teachers import (
    ANSWERED,
    CHARGED,
    FREE,
    LATE,
    UNCERTAIN,
    BudgetExhausted,
    Meter,
    Teacher,
    as_batch,
    image_keys,
)

__all__ = [
    "FORMAT",
    "BudgetExhausted",
    "LedgerError",
    "LedgerMismatchError",
    "QueryLedger",
    "choose_subset",
    "ledger_path",
    "parse_budget",
]

FORMAT = "fakecifar-query-ledger"
VERSION = 1
SUFFIX = ".queries"
MODE_COUNTERS = ("queries", "unique", "repeated", "lost", "pending", "cache_hits", "sent", "interrupted")
GLOBAL_COUNTERS = ("requests", "failed_requests", "server_base", "server_seen", "since_seen", "foreign", "discrepancy")
_NONE = -1  # server_base / server_seen not known yet
WHITE_BOX = "white-box"  # the mode key of QueryLedger.charge's images by default
JOURNAL_MODE = "WAL"  # SQLite's journal (see the module docstring); DELETE is the rollback journal
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    mode TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (mode, name));
CREATE TABLE IF NOT EXISTS answers (
    key BLOB NOT NULL, mode TEXT NOT NULL, label INTEGER NOT NULL, vals BLOB,
    PRIMARY KEY (key, mode)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inflight (
    id INTEGER PRIMARY KEY, mode TEXT NOT NULL, images INTEGER NOT NULL, requests INTEGER NOT NULL,
    started TEXT NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS late (mode TEXT NOT NULL, images INTEGER NOT NULL, until REAL NOT NULL);
"""
_TABLES = {"meta", "counters", "answers", "inflight", "late"}


class LedgerError(UsageError):
    """A file that should be a query ledger is not one, or is damaged (exit 2)."""


class LedgerMismatchError(UsageError):
    """The ledger belongs to another teacher (exit 2)."""


def ledger_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the ledger of a student checkpoint lives: `student.pt` -> `student.pt.queries`."""
    return Path(os.fspath(checkpoint) + SUFFIX)


@contextlib.contextmanager
def run_ledger(
    checkpoint: str | os.PathLike[str], teacher: Teacher, *, budget: int | None, cache: bool, main: bool = True
) -> Iterator[QueryLedger | None]:
    """The ledger of the run writing `checkpoint`, open on the process that keeps it (`main`:
    rank 0 under torchrun, which asks the teacher for every process); None on the others."""
    if not main:
        yield None
        return
    with QueryLedger(ledger_path(checkpoint), budget=budget, teacher=teacher, cache=cache) as ledger:
        yield ledger


def choose_subset(n_available: int, budget: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the transfer images to query: all of them when the budget allows,
    else a seeded random `budget` of them (the same for the same seed: a resumed run queries
    the same subset, which its cache already answered)."""
    if n_available < 0 or (budget is not None and budget < 0):
        raise UsageError(f"choose_subset: negative sizes ({n_available}, {budget})")
    if budget is None or budget >= n_available:
        return np.arange(n_available, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_available, size=budget, replace=False)).astype(np.int64)


class _State:
    """The counters, as one dict keyed by (mode, name); mode "" holds the global ones. `late`:
    the pending images of attempts the server may still charge, [mode, images, until] (a
    wall-clock time: after it, a figure that does not show them charged makes them free)."""

    def __init__(self, values: dict[tuple[str, str], int] | None = None, late: Iterable[Sequence[Any]] = ()):
        self.values: dict[tuple[str, str], int] = dict(values or {})
        self.late: list[list[Any]] = [[str(m), int(n), float(u)] for m, n, u in late]

    def copy(self) -> _State:
        return _State(self.values, self.late)

    def same(self, other: _State) -> bool:
        return self.values == other.values and self.late == other.late

    def get(self, mode: str, name: str) -> int:
        default = _NONE if name in ("server_base", "server_seen") else 0
        return self.values.get((mode, name), default)

    def add(self, mode: str, name: str, n: int) -> None:
        self.values[(mode, name)] = self.get(mode, name) + int(n)

    def set(self, mode: str, name: str, n: int) -> None:
        self.values[(mode, name)] = int(n)

    def modes(self) -> list[str]:
        return sorted({m for m, _ in self.values if m})

    def total(self, name: str) -> int:
        return sum(self.get(m, name) for m in self.modes())

    def spent(self) -> int:
        """What the budget counts: charged images plus those that may have been."""
        return self.total("queries") + self.total("pending")


class _LedgerMeter(Meter):
    """The ledger's side of one teacher call: the intent before each attempt (the first one
    creates the call's inflight row), the outcome after it, applied to a working copy of the
    counters that the call's transaction stores."""

    def __init__(self, ledger: QueryLedger, state: _State, mode: str, teacher: Teacher):
        self.ledger, self.state, self.mode, self.teacher = ledger, state, mode, teacher
        self.intent: int | None = None  # the call's inflight row, once an attempt was announced
        self.open_attempt: int | None = None  # images of an attempt begun but not reported

    def before_attempt(self, teacher: Teacher, n: int) -> None:
        self.ledger._check_budget(self.state, n, teacher)
        self.intent = self.ledger._write_intent(self.intent, self.mode, n, teacher.charge_window)
        self.open_attempt = n

    def after_attempt(self, n: int, outcome: str, figure: int | None = None) -> None:
        self.open_attempt = None
        if outcome == FREE and self.teacher.server_metered and self.intent is not None:
            self.ledger._free_intent(self.intent, n)  # a kill from now on must not count it
        st, mode = self.state, self.mode
        st.add(mode, "sent", n)
        st.add("", "requests", 1)
        if outcome != ANSWERED:
            st.add("", "failed_requests", 1)
        if outcome in (ANSWERED, CHARGED):
            st.add(mode, "queries", n)
            if outcome == CHARGED:
                st.add(mode, "lost", n)
            if self.teacher.server_metered:
                st.add("", "since_seen", n)
        elif outcome in (UNCERTAIN, LATE):
            st.add(mode, "pending", n)
            if outcome == LATE:
                st.late.append([mode, n, time.time() + self.teacher.charge_window])
        if figure is not None:
            _apply_figure(st, figure)

    def figure(self, images: int) -> None:
        _apply_figure(self.state, images)


def _apply_figure(st: _State, figure: int, now: float | None = None) -> None:
    """The server says it has charged `figure` images to the key in all: settle what is pending.

    Since the last figure the ledger confirmed `since_seen` images (200s); what the server
    charged beyond those is what the pending attempts cost (lost: no answer came back), up to
    their number; more than that was spent by someone else on the key (`foreign`). Of the
    pending images the figure does not show charged, those of LATE attempts still within their
    window stay pending (the server may be computing them yet); the others were never charged."""
    now = time.time() if now is None else now
    pending = {mode: st.get(mode, "pending") for mode in st.modes()}
    pool = sum(pending.values())
    seen, confirmed = st.get("", "server_seen"), st.get("", "since_seen")
    if seen == _NONE:  # the first figure ever: what is pending is taken as charged (the safe side)
        charged = pool
        base = figure - confirmed - pool
        if base < 0:
            st.add("", "discrepancy", -base)
        st.set("", "server_base", max(0, base))
    else:
        extra = figure - seen - confirmed
        if extra < 0:  # the server shows less than the protocol says it charged (a restart?)
            st.add("", "discrepancy", -extra)
            charged = 0
        else:
            charged = min(extra, pool)
            st.add("", "foreign", extra - charged)
    keep, kept = pool - charged, []
    for mode, n, until in reversed(st.late):  # the newest first: the likeliest to be charged yet
        take = min(n, keep, pending[mode]) if until > now else 0
        if take > 0:
            kept.append([mode, take, until])
            pending[mode] -= take
            keep -= take
    st.late = kept[::-1]
    left = charged
    for mode in st.modes():  # the charged images come out of the pending that is not kept
        take = min(pending[mode], left)
        if take:
            st.add(mode, "queries", take)
            st.add(mode, "lost", take)
            left -= take
        st.set(mode, "pending", sum(n for m, n, _ in st.late if m == mode))
    st.set("", "server_seen", figure)
    st.set("", "since_seen", 0)


class QueryLedger:
    """The metered, budgeted, cached way to ask a teacher (see the module docstring).

    `budget`: the hard limit on charged images (`--queries N`); None keeps the budget stored in
    the ledger (a resumed run keeps its own), if any. `cache=False` sends every image every
    time and looks nothing up (answers are still stored; repeats are counted as `repeated`).
    `teacher` binds the ledger at once (identity check, interrupted calls settled); otherwise
    the first `ask` does. The file is locked for the ledger's life: a second process gets OutputBusyError."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        budget: int | None = None,
        teacher: Teacher | None = None,
        cache: bool = True,
    ):
        self.path = Path(path)
        self.cache = bool(cache)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise UsageError(f"--queries must be a non-negative number of images, got {budget!r}")
        self._lock = threading.RLock()
        self._bound: dict[str, Any] | None = None
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        existed = self.path.exists() and self.path.stat().st_size > 0  # empty: a creation cut short
        if existed and not self.path.is_file():
            raise LedgerError(f"{self.path}: not a query ledger (not a file)")
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise self._db_error(exc, "open") from exc
        self._take_file_lock()
        try:
            self._setup(existed, budget)
        except BaseException:
            self.close()
            raise
        if teacher is not None:
            try:
                self.bind(teacher)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ file

    def _take_file_lock(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            self.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(
                    f"{self.path} is in use by another process (a run on the same student checkpoint)",
                    "wait for it to finish, or choose another -o",
                ) from None
            raise OutputError(f"cannot lock {self.path}: {exc.strerror}") from exc
        self._lock_fd = fd

    def _db_error(self, exc: sqlite3.Error, doing: str) -> FakecifarError:
        text = str(exc)
        low = text.lower()
        if "disk is full" in low or "disk i/o" in low and _disk_full(self.path):
            return NoSpaceError(f"no space left on device writing {self.path}", "free space and rerun with --resume")
        if "readonly" in low or "read-only" in low or "unable to open" in low:
            return OutputError(f"cannot {doing} the query ledger {self.path}: {text}", "check the file's permissions")
        if "not a database" in low or "malformed" in low or "no such table" in low:
            return LedgerError(
                f"{self.path}: not a query ledger or damaged ({text})",
                "the ledger is written beside the student checkpoint; move this file away to start a new one",
            )
        return FakecifarError(f"query ledger {self.path}: cannot {doing}: {text}")

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FakecifarError(f"query ledger {self.path} is closed")
        return self._conn

    def _setup(self, existed: bool, budget: int | None) -> None:
        try:
            # One process holds the ledger (the file lock): SQLite's own lock is taken once and
            # kept, and the WAL index lives in memory (no -shm file). First: any other statement
            # opens a WAL file left by a kill with a shared-memory index.
            self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.conn.execute("PRAGMA synchronous=FULL")
            if existed:
                self._check_format()
            else:  # schema and format in one transaction: a kill leaves an empty file or a ledger
                header = ";".join(
                    f"INSERT INTO meta (key, value) VALUES ('{k}', '{json.dumps(v)}')"
                    for k, v in (("format", FORMAT), ("version", VERSION), ("created", utc_now()))
                )
                self.conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{header};COMMIT;")
            # After the creation (written straight into the file, so that a ledger is never an
            # empty file plus a -wal): one fsync per commit, not the rollback journal's several.
            self.conn.execute(f"PRAGMA journal_mode={JOURNAL_MODE}")
            self._state = self._load_state()
            if budget is not None and budget != self._get_meta("budget"):
                self._begin()
                self._put_meta("budget", budget)
                self.conn.execute("COMMIT")
            self.budget: int | None = self._get_meta("budget")
            self._session_start = self._state.copy()
            self._resolve_inflight()
            if JOURNAL_MODE == "WAL":  # what a killed run left in the log goes into the file now
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._db_error(exc, "read") from exc

    def _check_format(self) -> None:
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise self._db_error(exc, "read") from exc
        if not tables.issuperset(_TABLES) or self._get_meta("format") != FORMAT:
            raise LedgerError(
                f"{self.path}: not a fakecifar query ledger",
                "the ledger is written beside the student checkpoint; move this file away to start a new one",
            )
        version = self._get_meta("version")
        if not isinstance(version, int) or version > VERSION:
            raise LedgerError(f"{self.path}: query ledger version {version!r} is newer than this fakecifar reads")

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _put_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def _load_state(self) -> _State:
        values = {(m, n): int(v) for m, n, v in self.conn.execute("SELECT mode, name, value FROM counters")}
        late = self.conn.execute("SELECT mode, images, until FROM late ORDER BY rowid").fetchall()
        return _State(values, late)

    def _write_state(self, st: _State) -> None:
        """Store `st` where it differs from the committed state (self._state, which the file
        holds): the counters that changed, the late list if it did."""
        old = self._state
        changed = [(m, n, v) for (m, n), v in st.values.items() if old.values.get((m, n)) != v]
        if changed:
            self.conn.executemany("INSERT OR REPLACE INTO counters (mode, name, value) VALUES (?, ?, ?)", changed)
        if st.late != old.late:
            self.conn.execute("DELETE FROM late")
            self.conn.executemany("INSERT INTO late (mode, images, until) VALUES (?, ?, ?)", st.late)

    def _resolve_inflight(self) -> None:
        """Calls a kill cut short (see the module docstring): local -> interrupted, remote ->
        pending until the server's account says what was charged."""
        rows = self.conn.execute("SELECT id, mode, images, requests, until FROM inflight").fetchall()
        if not rows:
            return
        identity = self._get_meta("teacher") or {}
        remote = identity.get("kind") == "remote"
        st = self._state.copy()
        for _, mode, images, requests, until in rows:
            st.add(mode, "interrupted", images)
            st.add(mode, "sent", images)
            st.add("", "requests", requests)
            st.add("", "failed_requests", requests)
            if remote and images:  # the server may have charged them, or may still
                st.add(mode, "pending", images)
                st.late.append([mode, images, until])
        self._begin()
        self._write_state(st)
        self.conn.execute("DELETE FROM inflight")
        self.conn.execute("COMMIT")
        self._state = st
        self._session_start = st.copy()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> QueryLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ teacher

    def bind(self, teacher: Teacher) -> None:
        """Record the teacher (a new ledger) or check it is the one recorded; for a remote
        teacher, settle what is pending (and learn the server's base) from its account."""
        with self._lock:
            identity = teacher.identity()
            if self._bound is not None:
                if identity != self._bound:
                    raise LedgerMismatchError(f"{self.path}: one ledger meters one teacher; {teacher.name} is another")
                return
            stored = self._get_meta("teacher")
            if stored is None:
                self._begin()
                self._put_meta("teacher", identity)
                self._put_meta("describe", teacher.describe())
                self.conn.execute("COMMIT")
            elif stored != identity:
                raise LedgerMismatchError(
                    f"{self.path}: this query ledger belongs to {_identity_text(stored)}, "
                    f"not {_identity_text(identity)}",
                    "resume with the same teacher, or write the student elsewhere (-o) to start a new ledger",
                )
            self._bound = identity
            if teacher.server_metered and (
                self._state.get("", "server_seen") == _NONE or self._state.total("pending") > 0
            ):
                figure = teacher.account()
                if figure is not None:
                    st = self._state.copy()
                    _apply_figure(st, figure)
                    self._commit(st)

    def _check_budget(self, st: _State, n: int, teacher: Teacher) -> None:
        if self.budget is None or st.spent() + n <= self.budget:
            return
        if st.total("pending") and teacher.server_metered:
            figure = teacher.account()
            if figure is not None:
                _apply_figure(st, figure)
                if st.spent() + n <= self.budget:
                    return
        spent = st.spent()
        pending = st.total("pending")
        unknown = f", {pending:,} of them not yet confirmed by the server" if pending else ""
        raise BudgetExhausted(
            f"query budget exhausted: {spent:,} of {self.budget:,} images spent{unknown}; "
            f"{n:,} more would exceed --queries {self.budget:,}",
            "the run stops here; raise --queries to continue",
            source="ledger",
            budget=self.budget,
            spent=spent,
            needed=n,
        )

    def _write_intent(self, intent: int | None, mode: str, n: int, window: float) -> int:
        """Commit, before an attempt of `n` images, that it may be charged: the call's inflight
        row is created by its first attempt (None) and grows with each retry. Returns its id."""
        try:
            self._begin()
            until = time.time() + window
            if intent is None:
                cursor = self.conn.execute(
                    "INSERT INTO inflight (mode, images, requests, started, until) VALUES (?, ?, 1, ?, ?)",
                    (mode, n, utc_now(), until),
                )
                intent = int(cursor.lastrowid or 0)
            else:
                self.conn.execute(
                    "UPDATE inflight SET images = images + ?, requests = requests + 1, until = ? WHERE id = ?",
                    (n, until, intent),
                )
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._db_error(exc, "write") from exc
        return intent

    def _free_intent(self, intent: int, n: int) -> None:
        try:
            self._begin()
            self.conn.execute("UPDATE inflight SET images = MAX(0, images - ?) WHERE id = ?", (n, intent))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._db_error(exc, "write") from exc

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _commit(
        self,
        st: _State,
        rows: Sequence[tuple[bytes, str, int, bytes | None]] = (),
        intent: int | None = None,
        *,
        count: str | None = None,
    ) -> None:
        """One transaction: the answers `rows` (stored once per key and mode), the counters of
        `st`, the inflight row `intent` removed. `count`: the mode whose `unique`/`repeated`
        counters take the rows (a row already stored, or earlier in `rows`, is a repeat)."""
        try:
            self._begin()
            if rows:
                cursor = self.conn.executemany(
                    "INSERT OR IGNORE INTO answers (key, mode, label, vals) VALUES (?, ?, ?, ?)", rows
                )
                if count is not None:
                    new = int(cursor.rowcount)
                    st.add(count, "unique", new)
                    st.add(count, "repeated", len(rows) - new)
            self._write_state(st)
            if intent is not None:
                self.conn.execute("DELETE FROM inflight WHERE id = ?", (intent,))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._db_error(exc, "write") from exc
        self._state = st

    # ------------------------------------------------------------------ asking

    @property
    def spent(self) -> int:
        """Images charged, plus those that may have been (pending): what the budget counts."""
        return self._state.spent()

    @property
    def remaining(self) -> int | None:
        """Images the budget still allows (None: no budget)."""
        return None if self.budget is None else max(0, self.budget - self.spent)

    def _lookup(self, keys: Iterable[bytes], mode: str) -> dict[bytes, tuple[int, bytes | None]]:
        found: dict[bytes, tuple[int, bytes | None]] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            part = unique[i : i + 500]
            marks = ",".join("?" * len(part))
            for key, label, vals in self.conn.execute(
                f"SELECT key, label, vals FROM answers WHERE mode = ? AND key IN ({marks})", (mode, *part)
            ):
                found[bytes(key)] = (int(label), None if vals is None else bytes(vals))
        return found

    def ask(self, teacher: Teacher, images: Any) -> Answers:
        """Answers for images float32 [N, 3, H, W] in [0, 1] (numpy or torch), in the teacher's
        mode: from the cache where answered before, else from the teacher (each distinct image
        once; batches of teacher.max_batch, one transaction each). Raises BudgetExhausted
        before sending anything when the images to send do not fit the budget."""
        with self._lock:
            self.bind(teacher)
            batch = as_batch(images, teacher.input_size, name=teacher.name)
            mode = str(teacher.mode)
            keys = image_keys(batch)
            try:
                cached = self._lookup(keys, mode) if self.cache else {}
            except sqlite3.Error as exc:
                raise self._db_error(exc, "read") from exc
            if self.cache:
                first: dict[bytes, int] = {}
                for i, key in enumerate(keys):
                    if key not in cached and key not in first:
                        first[key] = i
                send = list(first.values())
            else:
                send = list(range(len(keys)))
            hits = len(keys) - len(send)
            st = self._state.copy()
            try:
                self._check_budget(st, len(send), teacher)  # before anything is sent
            finally:
                if not st.same(self._state):  # the server's account settled what was pending
                    self._commit(st)
            fresh: dict[bytes, tuple[int, bytes | None]] = {}
            step = teacher.max_batch
            for start in range(0, len(send), step):
                chunk = send[start : start + step]
                last = start + step >= len(send)
                got = self._call(teacher, batch[chunk], [keys[i] for i in chunk], mode, hits if last else 0)
                fresh.update(got)
            if not send and hits:
                st = self._state.copy()
                st.add(mode, "cache_hits", hits)
                self._commit(st)
            return self._assemble(keys, {**cached, **fresh}, teacher.mode, teacher.num_classes)

    def _call(
        self, teacher: Teacher, images: np.ndarray, keys: list[bytes], mode: str, hits: int
    ) -> dict[bytes, tuple[int, bytes | None]]:
        """One teacher call: an intent before each attempt, then one transaction with the outcome."""
        st = self._state.copy()
        meter = _LedgerMeter(self, st, mode, teacher)
        answers: Answers | None = None
        rows: list[tuple[bytes, str, int, bytes | None]] = []
        try:
            answers = teacher.send(images, meter)
            if len(answers) != len(keys):
                raise FakecifarError(f"{teacher.name}: {len(answers)} answers for {len(keys)} images")
        finally:
            if meter.open_attempt is not None:  # an attempt cut short inside the process (Ctrl-C)
                n = meter.open_attempt
                st.add(mode, "sent", n)
                st.add(mode, "interrupted", n)
                st.add("", "requests", 1)
                st.add("", "failed_requests", 1)
                if teacher.server_metered:  # the server may charge it still
                    st.add(mode, "pending", n)
                    st.late.append([mode, n, time.time() + teacher.charge_window])
            if answers is not None and len(answers) == len(keys):
                rows = self._rows(keys, answers, mode)
                st.add(mode, "cache_hits", hits)
            if meter.intent is not None or rows or not st.same(self._state):
                self._commit(st, rows, meter.intent, count=mode if rows else None)
        return {key: (label, vals) for key, _, label, vals in rows}

    @staticmethod
    def _rows(keys: list[bytes], answers: Answers, mode: str) -> list[tuple[bytes, str, int, bytes | None]]:
        labels = answers.labels.tolist()
        soft = answers.logits if answers.logits is not None else answers.log_probs
        if soft is None:
            return [(key, mode, int(labels[i]), None) for i, key in enumerate(keys)]
        soft = np.ascontiguousarray(soft, dtype=np.float32)
        return [(key, mode, int(labels[i]), soft[i].tobytes()) for i, key in enumerate(keys)]

    @staticmethod
    def _assemble(
        keys: list[bytes], table: dict[bytes, tuple[int, bytes | None]], mode: OutputMode, num_classes: int
    ) -> Answers:
        entries = [table[k] for k in keys]
        labels = np.array([label for label, _ in entries], dtype=np.int64)
        if mode.kind == "label":
            return Answers(mode, labels, None)
        blobs = [vals for _, vals in entries if vals is not None and len(vals) == 4 * num_classes]
        if len(blobs) == len(entries):  # one copy into a writable buffer
            soft = np.frombuffer(bytearray().join(blobs), dtype=np.float32).reshape(len(keys), num_classes)
        else:
            soft = np.zeros((len(keys), num_classes), dtype=np.float32)
            for i, (_, vals) in enumerate(entries):
                if vals is not None:
                    soft[i] = np.frombuffer(vals, dtype=np.float32)
        return Answers(mode, labels, soft, soft if mode.kind == "logits" else None)

    def charge(self, teacher: Teacher, n: int, *, kind: str = WHITE_BOX) -> None:
        """Meter `n` images that the caller forwards through the teacher itself: white-box
        methods run a local torch teacher's `module` on generated images, with gradients, so
        no answer can come from (or go into) the cache. Call it before the forward pass.

        The hard budget is checked first (BudgetExhausted, as `ask` raises it, and nothing is
        counted); then the images are counted as `queries` (all `unique`) and `sent`, under the
        mode `kind` ("white-box"; any name that is not an output mode), with one request, in one
        committed transaction: across a kill -9 a charge has happened or not. A remote teacher
        is refused (its server counts what it answers: ask it through `ask`)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise UsageError(f"charge: the number of images must be a non-negative integer, got {n!r}")
        kind = str(kind)
        if not kind or _is_output_mode(kind):
            raise UsageError(f"charge: kind {kind!r} must be a name that is not an output mode (e.g. {WHITE_BOX!r})")
        with self._lock:
            self.bind(teacher)
            if teacher.server_metered:
                raise UsageError(
                    f"charge: {teacher.name} is a remote teacher: its server counts what it answers",
                    "ask it through QueryLedger.ask",
                )
            n = int(n)
            st = self._state.copy()
            self._check_budget(st, n, teacher)  # a local teacher: nothing pending to settle
            if n == 0:
                return
            st.add(kind, "queries", n)
            st.add(kind, "unique", n)
            st.add(kind, "sent", n)
            st.add("", "requests", 1)
            self._commit(st)

    # ------------------------------------------------------------------ reports

    def note_subset(self, available: int, chosen: int, seed: int) -> None:
        """Record that a seeded random subset of the transfer set was queried (for the report)."""
        value = {"available": int(available), "queried": int(chosen), "seed": int(seed)}
        with self._lock:
            self._begin()
            self._put_meta("subset", value)
            self.conn.execute("COMMIT")

    def summary(self) -> dict[str, Any]:
        """The ledger as a JSON-able dict: for the student checkpoint's metadata and reports."""
        with self._lock:
            st = self._state
            totals = {name: st.total(name) for name in MODE_COUNTERS}
            session = {name: totals[name] - self._session_start.total(name) for name in ("queries", "cache_hits")}
            session["requests"] = st.get("", "requests") - self._session_start.get("", "requests")
            out: dict[str, Any] = {
                "format": FORMAT,
                "path": str(self.path),
                "teacher": self._get_meta("describe"),
                "budget": self.budget,
                "remaining": self.remaining,
                **totals,
                "requests": st.get("", "requests"),
                "failed_requests": st.get("", "failed_requests"),
                "by_mode": {m: {name: st.get(m, name) for name in MODE_COUNTERS} for m in st.modes()},
                # images the run forwarded itself (QueryLedger.charge), by kind: part of `queries`
                "charged": {m: st.get(m, "queries") for m in st.modes() if not _is_output_mode(m)},
                "cached_answers": int(self.conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]),
                "cache": self.cache,
                "subset": self._get_meta("subset"),
                "session": session,
            }
            base, seen = st.get("", "server_base"), st.get("", "server_seen")
            identity = self._get_meta("teacher") or {}
            if identity.get("kind") == "remote":
                out["server"] = {
                    "base": None if base == _NONE else base,
                    "seen": None if seen == _NONE else seen,
                    "charged": None if _NONE in (base, seen) else seen - base,
                    "foreign": st.get("", "foreign"),
                    "discrepancy": st.get("", "discrepancy"),
                }
            return out

    def report_lines(self) -> list[str]:
        """What a run prints at the end: the queries, the subset note, the server's count."""
        s = self.summary()
        budget = f" of {s['budget']:,} ({s['remaining']:,} left)" if s["budget"] is not None else ""
        parts = [f"{s['unique']:,} unique"]
        for name in ("repeated", "lost", "pending"):
            if s[name]:
                parts.append(f"{s[name]:,} {name}")
        lines = [
            f"queries: {s['queries']:,}{budget}: {', '.join(parts)}; {s['cache_hits']:,} answered from the cache; "
            f"{s['requests']:,} requests ({s['failed_requests']:,} failed)"
        ]
        if len(s["by_mode"]) > 1:
            lines.append("by mode: " + ", ".join(f"{m} {c['queries']:,}" for m, c in s["by_mode"].items()))
        for kind, n in s["charged"].items():
            lines.append(f"{kind}: {n:,} images forwarded through the teacher by the run itself (charged, not cached)")
        if s["interrupted"]:
            lines.append(f"interrupted: {s['interrupted']:,} images were in flight when a run was killed")
        subset = s["subset"]
        if subset and subset["queried"] < subset["available"]:
            lines.append(
                f"subset: the budget allows {subset['queried']:,} of the {subset['available']:,} transfer images; "
                f"a seeded random subset was queried (seed {subset['seed']})"
            )
        server = s.get("server")
        if server and server["charged"] is not None:
            extra = ""
            if server["foreign"]:
                extra += f"; {server['foreign']:,} charged to the key by another client"
            if server["discrepancy"]:
                extra += f"; the server shows {server['discrepancy']:,} fewer than the ledger"
            lines.append(f"server: charged {server['charged']:,} images to this key during the run{extra}")
        return lines


def _is_output_mode(name: str) -> bool:
    try:
        parse_mode(name)
    except UsageError:
        return False
    return True


def _identity_text(identity: dict[str, Any]) -> str:
    kind = identity.get("kind", "?")
    if kind == "remote":
        return f"the remote teacher {identity.get('url')} (model {identity.get('model')})"
    sha = str(identity.get("sha256", ""))[:12]
    return f"a {kind} teacher with sha256 {sha}"


def _disk_full(path: Path) -> bool:
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)


def parse_budget(text: str | int | None) -> int | None:
    """`--queries` as typed: '5000', '5k', '1.5m' (None/'' : no budget)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        value = text
    else:
        spec = str(text).strip().lower().replace("_", "").replace(",", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(spec[-1:], 1)
        number = spec[:-1] if scale > 1 else spec
        try:
            value = int(float(number) * scale) if scale > 1 else int(number)
        except ValueError:
            raise UsageError(f"--queries {text!r} is not a number of images", "e.g. --queries 5000 or 50k") from None
    if value < 0:
        raise UsageError(f"--queries must not be negative, got {value}")
    return value
