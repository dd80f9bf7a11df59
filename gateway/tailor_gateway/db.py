"""The gateway's database: SQLite by default, PostgreSQL in clusters, behind the same few calls.

Statements are written once, in the subset both engines accept (`?` placeholders, `ON CONFLICT`,
TEXT / INTEGER / DOUBLE PRECISION); the PostgreSQL backend only rewrites the placeholders.
Every call is one transaction, committed before it returns: the engine acts only on what is durable.

Transient failures (PostgreSQL restarting or unreachable, an SQLite file write-locked by another
process) are retried with backoff for `retry_s`, each retry logged; past that the call raises
DatabaseUnavailable (UNAVAILABLE to a client; the engine drives the pipeline again later). The calls
block: the gateway runs them in threads (StateStore.run), never on its event loop.

One gateway at a time drives a state: `hold_exclusive()` takes a PostgreSQL session advisory lock on a
connection of its own, or an flock on `<db>.lock` beside the SQLite file, and stands by until it gets it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailor_runtime.errors import Unavailable

log = logging.getLogger("tailor.gateway.db")
Statement = tuple[str, tuple]
# A call waits this long, retrying, for the database to come back (a PostgreSQL restart, a failover,
# another process holding SQLite's write lock) before it gives up with DatabaseUnavailable.
RETRY_S = 30.0
# The one lock a gateway holds while it drives the state (the schema lock below is another key).
ACTIVE_GATEWAY_KEY = 7274658
STANDBY_POLL_S = 2.0


class Conflict(Exception):
    """A unique constraint refused the write (e.g. a racing submission with the same idempotency key)."""


class DatabaseUnavailable(Unavailable):
    """The database did not answer within the retry budget: nothing was written by this call."""


class _Backoff:
    def __init__(self, base: float = 0.1, cap: float = 2.0):
        self.delay, self.cap = base, cap

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay


class Database:
    """What the state, token and audit tables need: transactions of statements, and queries."""

    dialect = "?"
    retry_s = RETRY_S

    def execute(self, statements: list[Statement]) -> None:
        raise NotImplementedError

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def hold_exclusive(self, on_lost: Callable[[], None] | None = None) -> None:
        """Block until this process is the one gateway driving the state (see the module doc)."""
        raise NotImplementedError

    def sidecar(self, name: str) -> Path | None:
        """A file beside the database that every process using it can reach (SQLite only: they share
        its directory), for cheap signals between them; None where there is no such place."""
        return None

    def _transient(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        started, backoff = time.monotonic(), _Backoff()
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not self._transient(exc):
                    raise
                waited = time.monotonic() - started
                if waited >= self.retry_s:
                    raise DatabaseUnavailable(
                        f"the gateway's {self.dialect} database did not answer for {waited:.0f}s "
                        f"({type(exc).__name__}: {str(exc).strip()[:200]}); retry later"
                    ) from None
                delay = backoff.next()
                log.warning(
                    "database %s failed (%s: %s); retrying in %.1fs",
                    what,
                    type(exc).__name__,
                    str(exc).strip()[:200],
                    delay,
                )
                time.sleep(delay)


class SqliteDatabase(Database):
    """A write connection behind a lock, and a read connection per thread: in WAL mode readers are not
    blocked by a writer (ours, or another process holding the write lock), nor by each other, so reads
    keep answering. Per thread, not one shared: a token check must never wait for a
    database thread's listing (issue 23's load bar)."""

    dialect = "sqlite"

    def __init__(self, path: Path, schema: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = self._connect()
        self._db.executescript(schema)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._lock_file: int | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is not synced to disk (the WAL is, at checkpoints). A power loss
        # may drop the last transactions, never corrupt the file; a crashed process loses nothing.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Short: a longer wait is the retry loop's, with backoff and a log line.
        conn.execute("PRAGMA busy_timeout=1000")
        return conn

    def sidecar(self, name: str) -> Path | None:
        return self.path.with_name(f"{self.path.name}.{name}")

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (made at its first read)."""
        conn = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._local.reader = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        self._db.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        if self._lock_file is not None:
            os.close(self._lock_file)

    def _transient(self, exc: BaseException) -> bool:
        # "database is locked" / "database is busy": another connection holds the write lock.
        return isinstance(exc, sqlite3.OperationalError) and any(
            word in str(exc) for word in ("locked", "busy")
        )

    def execute(self, statements: list[Statement]) -> None:
        def attempt():
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        self._db.execute(sql, args)
                    self._db.execute("COMMIT")
                except sqlite3.IntegrityError as exc:
                    self._db.execute("ROLLBACK")
                    raise Conflict(str(exc)) from None
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise

        self._retrying("write", attempt)

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        def attempt():
            cursor = self._reader().execute(sql, args)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return self._retrying("read", attempt)

    def hold_exclusive(self, on_lost: Callable[[], None] | None = None) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log.warning(
                        "another gateway is driving the state %s (it holds %s): standing by until it stops",
                        self.path,
                        lock_path,
                    )
                    told = True
                time.sleep(STANDBY_POLL_S)
        # Who holds it, for a person looking at the file; the lock itself is the flock (gone with us).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_file = fd
        log.info("this gateway drives the state %s", self.path)


class PostgresDatabase(Database):
    """One connection behind a lock (the gateway's writes are small and few); on a lost connection a new
    one is made and the call retried, with backoff, for `retry_s`."""

    dialect = "postgresql"

    def __init__(self, url: str, schema: str, connect_timeout_s: float = 30.0):
        import psycopg  # lazy: only clusters need it

        self._psycopg = psycopg
        self._url = url
        self._lock = threading.Lock()
        self._conn = self._connect(connect_timeout_s)
        self._active: Any = None
        with self._conn.transaction():
            # Two gateways starting together must not both create the tables.
            self._conn.execute("SELECT pg_advisory_xact_lock(7274657)")
            self._conn.execute(schema)

    def _connect(self, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            except self._psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("PostgreSQL not reachable yet (%s); retrying", type(exc).__name__)
                time.sleep(1.0)

    def close(self) -> None:
        self._conn.close()
        if self._active is not None:
            self._active.close()

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _transient(self, exc: BaseException) -> bool:
        # OperationalError: connection refused or lost, the server shutting down or starting up.
        return isinstance(exc, self._psycopg.OperationalError | self._psycopg.InterfaceError)

    def _attempt(self, fn):
        with self._lock:
            if self._conn.closed or self._conn.broken:
                self._conn = self._psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            try:
                return fn()
            except (self._psycopg.OperationalError, self._psycopg.InterfaceError):
                self._conn.close()  # the next attempt connects anew
                raise

    def execute(self, statements: list[Statement]) -> None:
        def run():
            with self._conn.transaction():
                for sql, args in statements:
                    self._conn.execute(self._sql(sql), args)

        try:
            self._retrying("write", lambda: self._attempt(run))
        except self._psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc)) from None

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        def run():
            cursor = self._conn.execute(self._sql(sql), args)
            names = [d.name for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return self._retrying("read", lambda: self._attempt(run))

    def _try_lock(self) -> bool:
        if self._active is None or self._active.closed or self._active.broken:
            self._active = self._psycopg.connect(self._url, autocommit=True, connect_timeout=5)
        return bool(
            self._active.execute("SELECT pg_try_advisory_lock(%s)", (ACTIVE_GATEWAY_KEY,)).fetchone()[0]
        )

    def hold_exclusive(self, on_lost: Callable[[], None] | None = None) -> None:
        """A session lock: it lasts as long as its connection. A keeper thread checks that connection;
        when it broke (a PostgreSQL restart) the lock is taken again, and if another gateway took it
        meanwhile this one stops (`on_lost`, default SIGTERM to itself): never two drivers at once."""
        told = False
        while True:
            try:
                if self._try_lock():
                    break
                if not told:
                    log.warning("another gateway is driving this state: standing by until it stops")
                    told = True
            except self._psycopg.OperationalError as exc:
                log.warning("PostgreSQL not reachable for the gateway lock (%s); retrying", exc)
            time.sleep(STANDBY_POLL_S)
        log.info("this gateway drives the state (PostgreSQL advisory lock %d)", ACTIVE_GATEWAY_KEY)
        lost = on_lost or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        threading.Thread(target=self._keep_lock, args=(lost,), name="tailor-db-lock", daemon=True).start()

    def _keep_lock(self, on_lost: Callable[[], None]) -> None:
        held = True
        while True:
            time.sleep(STANDBY_POLL_S)
            try:
                if held:
                    self._active.execute("SELECT 1")
                    continue
                if self._try_lock():
                    log.warning("gateway lock taken again after the database connection was lost")
                    held = True
                    continue
                log.error("another gateway took over the state while the database was away: stopping")
                on_lost()
                return
            except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
                if held:
                    log.warning("the gateway lock's connection was lost (%s); taking it again", exc)
                held = False


def open_database(url: str, schema: str) -> Database:
    """`postgresql://...` -> PostgreSQL; a path or `sqlite:///path` -> SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, schema)
    return SqliteDatabase(Path(url.removeprefix("sqlite://")), schema)
