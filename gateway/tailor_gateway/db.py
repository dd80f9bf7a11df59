"""The gateway's database: SQLite by default, PostgreSQL in clusters, behind the same few calls.

Statements are written once, in the subset both engines accept (`?` placeholders, `ON CONFLICT`,
TEXT / INTEGER / DOUBLE PRECISION); the PostgreSQL backend only rewrites the placeholders.
Every call is one transaction, committed before it returns: the engine acts only on what is durable.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tailor.gateway.db")
Statement = tuple[str, tuple]


class Conflict(Exception):
    """A unique constraint refused the write (e.g. a racing submission with the same idempotency key)."""


class Database:
    """What the state, token and audit tables need: transactions of statements, and queries."""

    dialect = "?"

    def execute(self, statements: list[Statement]) -> None:
        raise NotImplementedError

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path, schema: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Another process (the `tailor tokens` CLI) may write at the same time: wait, do not fail.
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(schema)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def execute(self, statements: list[Statement]) -> None:
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
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(sql, args)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class PostgresDatabase(Database):
    """One connection behind a lock (the gateway's writes are small and few); reconnects once on loss."""

    dialect = "postgresql"

    def __init__(self, url: str, schema: str, connect_timeout_s: float = 30.0):
        import psycopg  # lazy: only clusters need it

        self._psycopg = psycopg
        self._url = url
        self._lock = threading.Lock()
        self._conn = self._connect(connect_timeout_s)
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

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _retrying(self, fn):
        with self._lock:
            try:
                return fn()
            except self._psycopg.OperationalError:
                # The server restarted or the connection dropped: a fresh connection, one more try.
                log.warning("PostgreSQL connection lost; reconnecting")
                self._conn.close()
                self._conn = self._connect()
                return fn()

    def execute(self, statements: list[Statement]) -> None:
        def run():
            with self._conn.transaction():
                for sql, args in statements:
                    self._conn.execute(self._sql(sql), args)

        try:
            self._retrying(run)
        except self._psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc)) from None

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        def run():
            cursor = self._conn.execute(self._sql(sql), args)
            names = [d.name for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return self._retrying(run)


def open_database(url: str, schema: str) -> Database:
    """`postgresql://...` -> PostgreSQL; a path or `sqlite:///path` -> SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, schema)
    return SqliteDatabase(Path(url.removeprefix("sqlite://")), schema)
