"""Durable pipeline state. Every transition is committed before the gateway acts on it.

SQLite by default (one file, WAL), PostgreSQL in clusters (`postgresql://...`): the same statements run
on both (see db.py). The tokens, artifact-ownership and audit tables live in the same database.
The methods block (and retry a database that is away, see db.py): async code calls them through
`await state.run(method, ...)`, which runs them on the store's own threads, off the event loop.
A finished pipeline (SUCCEEDED, FAILED, CANCELLED) is never changed again: a user's cancel is not
overwritten by a stage failing a moment later.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tailor_gateway.db import Conflict, Database, open_database

T = TypeVar("T")
# Threads for database calls: a few, so that a write waiting on a lock does not hold up every read.
DB_THREADS = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
  id TEXT PRIMARY KEY,
  project TEXT NOT NULL,
  name TEXT NOT NULL,
  spec_yaml TEXT NOT NULL,
  state TEXT NOT NULL,
  error_code INTEGER NOT NULL DEFAULT 0,
  error_message TEXT NOT NULL DEFAULT '',
  idempotency_key TEXT,
  summary_json TEXT NOT NULL DEFAULT '{}',
  report_json TEXT NOT NULL DEFAULT '{}',
  trace_parent TEXT NOT NULL DEFAULT '',
  created DOUBLE PRECISION NOT NULL,
  updated DOUBLE PRECISION NOT NULL,
  UNIQUE (project, idempotency_key)
);
CREATE TABLE IF NOT EXISTS stages (
  pipeline_id TEXT NOT NULL REFERENCES pipelines(id),
  name TEXT NOT NULL,
  kind TEXT NOT NULL,
  position INTEGER NOT NULL,
  depends_on_json TEXT NOT NULL,
  params_json TEXT NOT NULL,
  state TEXT NOT NULL,
  operation_id TEXT NOT NULL DEFAULT '',
  worker TEXT NOT NULL DEFAULT '',
  results_json TEXT NOT NULL DEFAULT '[]',
  metrics_json TEXT NOT NULL DEFAULT '{}',
  error_code INTEGER NOT NULL DEFAULT 0,
  error_message TEXT NOT NULL DEFAULT '',
  attempts INTEGER NOT NULL DEFAULT 0,
  cached INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (pipeline_id, name)
);
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY,
  token_hash TEXT NOT NULL UNIQUE,
  project TEXT NOT NULL,
  name TEXT NOT NULL DEFAULT '',
  created DOUBLE PRECISION NOT NULL,
  revoked DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS artifact_owners (
  artifact_id TEXT NOT NULL,
  project TEXT NOT NULL,
  kind TEXT NOT NULL DEFAULT '',
  created DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (project, artifact_id)
);
CREATE TABLE IF NOT EXISTS audit (
  id TEXT PRIMARY KEY,
  time DOUBLE PRECISION NOT NULL,
  project TEXT NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  target TEXT NOT NULL DEFAULT '',
  detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_by_project ON audit (project, time);
CREATE INDEX IF NOT EXISTS pipelines_by_state ON pipelines (state);
CREATE INDEX IF NOT EXISTS pipelines_by_project ON pipelines (project, created);
"""

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# Stage-only outcomes: a candidate the quantizer's accuracy gate refused, and the stages that needed it.
REJECTED, SKIPPED = "REJECTED", "SKIPPED"
# A stage in one of these is finished without failing the pipeline.
SETTLED = (SUCCEEDED, REJECTED, SKIPPED)


@dataclass
class StageRow:
    pipeline_id: str
    name: str
    kind: str
    position: int
    depends_on: list[str]
    params: dict[str, Any]
    state: str = PENDING
    operation_id: str = ""
    worker: str = ""
    results: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error_code: int = 0
    error_message: str = ""
    attempts: int = 0
    cached: bool = False


@dataclass
class PipelineRow:
    id: str
    project: str
    name: str
    spec_yaml: str
    state: str
    created: float
    updated: float
    error_code: int = 0
    error_message: str = ""
    idempotency_key: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)
    trace_parent: str = ""


class StateStore:
    def __init__(self, url: str | Path):
        self.db: Database = open_database(str(url), SCHEMA)
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.db.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a database thread (with the caller's context: the request's project
        and trace), so that a slow commit or a database that is away never stalls the event loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="tailor-db")
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def hold_exclusive(self) -> None:
        """Stand by until no other gateway drives this state, then hold it (see db.py)."""
        self.db.hold_exclusive()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        self.db.execute(statements)

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        return self.db.query(sql, args)

    # --- pipelines ------------------------------------------------------------------------------
    def create_pipeline(self, p: PipelineRow, stages: list[StageRow]) -> PipelineRow:
        """Insert p and its stages; with a racing twin of the same idempotency key, return the twin."""
        statements = [
            (
                "INSERT INTO pipelines (id, project, name, spec_yaml, state, idempotency_key, trace_parent,"
                " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    p.id,
                    p.project,
                    p.name,
                    p.spec_yaml,
                    p.state,
                    p.idempotency_key,
                    p.trace_parent,
                    p.created,
                    p.updated,
                ),
            )
        ]
        for s in stages:
            statements.append(
                (
                    "INSERT INTO stages (pipeline_id, name, kind, position, depends_on_json, params_json, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.pipeline_id,
                        s.name,
                        s.kind,
                        s.position,
                        json.dumps(s.depends_on),
                        json.dumps(s.params),
                        s.state,
                    ),
                )
            )
        try:
            self._tx(statements)
        except Conflict:
            twin = self.find_by_idempotency_key(p.project, p.idempotency_key) if p.idempotency_key else None
            if twin is None:
                raise
            return twin
        return p

    def find_by_idempotency_key(self, project: str, key: str) -> PipelineRow | None:
        rows = self._query(
            "SELECT * FROM pipelines WHERE project = ? AND idempotency_key = ?", (project, key)
        )
        return self._pipeline(rows[0]) if rows else None

    def get_pipeline(self, pipeline_id: str) -> PipelineRow | None:
        rows = self._query("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,))
        return self._pipeline(rows[0]) if rows else None

    def pipeline_ids_starting(self, project: str, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of the project's pipelines that start with `prefix` (tailor_gateway.ids)."""
        from tailor_gateway.ids import prefix_pattern

        rows = self._query(
            "SELECT id FROM pipelines WHERE project = ? AND id LIKE ? ORDER BY id LIMIT ?",
            (project, prefix_pattern(prefix), int(limit)),
        )
        return [r["id"] for r in rows]

    def list_pipelines(self, project: str | None = None, limit: int | None = None) -> list[PipelineRow]:
        """Oldest first; with a limit, the newest `limit` of them (still oldest first)."""
        where, args = ("WHERE project = ?", (project,)) if project is not None else ("", ())
        if limit is None:
            rows = self._query(f"SELECT * FROM pipelines {where} ORDER BY created", args)
        else:
            rows = self._query(
                f"SELECT * FROM pipelines {where} ORDER BY created DESC LIMIT ?", (*args, int(limit))
            )[::-1]
        return [self._pipeline(r) for r in rows]

    def unfinished_pipelines(self) -> list[PipelineRow]:
        rows = self._query(
            "SELECT * FROM pipelines WHERE state IN (?, ?) ORDER BY created", (PENDING, RUNNING)
        )
        return [self._pipeline(r) for r in rows]

    def set_pipeline(self, pipeline_id: str, **fields: Any) -> None:
        columns = {
            "state": fields.get("state"),
            "error_code": fields.get("error_code"),
            "error_message": fields.get("error_message"),
            "summary_json": json.dumps(fields["summary"]) if "summary" in fields else None,
            "report_json": json.dumps(fields["report"]) if "report" in fields else None,
        }
        sets = {k: v for k, v in columns.items() if v is not None}
        sql = (
            "UPDATE pipelines SET "
            + ", ".join(f"{k} = ?" for k in sets)
            + ", updated = ? WHERE id = ? AND state NOT IN (?, ?, ?)"
        )
        self._tx([(sql, (*sets.values(), time.time(), pipeline_id, *TERMINAL))])

    # --- stages ---------------------------------------------------------------------------------
    def stages(self, pipeline_id: str) -> list[StageRow]:
        rows = self._query("SELECT * FROM stages WHERE pipeline_id = ? ORDER BY position", (pipeline_id,))
        return [self._stage(r) for r in rows]

    def set_stage(self, pipeline_id: str, name: str, **fields: Any) -> None:
        encoders = {
            "results": ("results_json", json.dumps),
            "metrics": ("metrics_json", json.dumps),
            "cached": ("cached", int),
        }
        sets = {}
        for key, value in fields.items():
            column, encode = encoders.get(key, (key, lambda v: v))
            sets[column] = encode(value)
        sql = (
            "UPDATE stages SET " + ", ".join(f"{k} = ?" for k in sets) + " WHERE pipeline_id = ? AND name = ?"
        )
        self._tx([(sql, (*sets.values(), pipeline_id, name))])

    @staticmethod
    def _pipeline(r: dict) -> PipelineRow:
        return PipelineRow(
            id=r["id"],
            project=r["project"],
            name=r["name"],
            spec_yaml=r["spec_yaml"],
            state=r["state"],
            created=r["created"],
            updated=r["updated"],
            error_code=r["error_code"],
            error_message=r["error_message"],
            idempotency_key=r["idempotency_key"],
            summary=json.loads(r["summary_json"]),
            report=json.loads(r["report_json"]),
            trace_parent=r["trace_parent"],
        )

    @staticmethod
    def _stage(r: dict) -> StageRow:
        return StageRow(
            pipeline_id=r["pipeline_id"],
            name=r["name"],
            kind=r["kind"],
            position=r["position"],
            depends_on=json.loads(r["depends_on_json"]),
            params=json.loads(r["params_json"]),
            state=r["state"],
            operation_id=r["operation_id"],
            worker=r["worker"],
            results=json.loads(r["results_json"]),
            metrics=json.loads(r["metrics_json"]),
            error_code=r["error_code"],
            error_message=r["error_message"],
            attempts=r["attempts"],
            cached=bool(r["cached"]),
        )
