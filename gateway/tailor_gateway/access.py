"""Who may do what: API tokens, artifact ownership and the audit log, in the gateway's database.

Tokens are stored as sha256 hashes only, each scoped to one project and revocable. A verified token is
remembered for up to TOKEN_CACHE_TTL_S (tokens.VerifiedTokens), so most requests need no database read;
a revocation through revoke_token is refused at the next call in the revoking process and, on SQLite, in
every process on the same database file; elsewhere (PostgreSQL, another process) within
TOKEN_CACHE_TTL_S. Every artifact a project
uploads or a pipeline of it produces is recorded as owned by that project: the gateway shows a
project only what it owns (content addressing means two projects may own the same id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tailor_gateway.db import Database
from tailor_gateway.tokens import VerifiedTokens
from tailor_runtime.errors import InvalidArgument, NotFound, Unauthenticated

log = logging.getLogger("tailor.audit")
PROJECT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
TOKEN_PREFIX = "tlr_"


@dataclass(frozen=True)
class Principal:
    project: str
    token_id: str  # the token's public id (never the token): what the audit log and rate limits key on


@dataclass
class TokenInfo:
    id: str
    project: str
    name: str
    created: float
    revoked: float | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _digest(header: str) -> str:
    if not header.lower().startswith("bearer "):
        raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
    return token_hash(header[7:].strip())


def check_project(project: str) -> str:
    if not PROJECT.match(project):
        raise InvalidArgument("project must be 1-63 lowercase letters, digits, '.', '_' or '-'")
    return project


class Access:
    def __init__(self, db: Database, file_tokens: Callable[[], dict[str, str]] | None = None):
        self.db = db
        # Bootstrap tokens from TAILOR_TOKENS_FILE ('<sha256> <project>' lines), e.g. a mounted secret.
        self.file_tokens = file_tokens or dict
        self.verified = VerifiedTokens(db.sidecar("tokens-revoked"))

    # --- tokens ---------------------------------------------------------------------------------
    def create_token(self, project: str, name: str = "") -> tuple[str, TokenInfo]:
        """A new token for project: returns (the token, shown once; its record). Only the hash is kept."""
        check_project(project)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(uuid.uuid4().hex[:16], project, name, time.time(), None)
        self.db.execute(
            [
                (
                    "INSERT INTO tokens (id, token_hash, project, name, created) VALUES (?, ?, ?, ?, ?)",
                    (info.id, token_hash(token), project, name, info.created),
                )
            ]
        )
        return token, info

    def revoke_token(self, token_id: str) -> TokenInfo:
        rows = self.db.query("SELECT * FROM tokens WHERE id = ?", (token_id,))
        if not rows:
            raise NotFound(f"token {token_id!r} not found")
        if rows[0]["revoked"] is None:
            self.db.execute([("UPDATE tokens SET revoked = ? WHERE id = ?", (time.time(), token_id))])
        # After the commit: a gateway that re-reads on seeing this finds the token revoked.
        self.verified.invalidate()
        return self._info(self.db.query("SELECT * FROM tokens WHERE id = ?", (token_id,))[0])

    def list_tokens(self, project: str | None = None) -> list[TokenInfo]:
        if project is None:
            rows = self.db.query("SELECT * FROM tokens ORDER BY created")
        else:
            rows = self.db.query("SELECT * FROM tokens WHERE project = ? ORDER BY created", (project,))
        return [self._info(r) for r in rows]

    def authenticate(self, header: str) -> Principal:
        """`Bearer <token>` -> the principal, read from the database (blocks: call it off the event
        loop); Unauthenticated for a missing, unknown or revoked token. Remembers the answer."""
        digest = _digest(header)
        version = self.verified.version()
        try:
            principal = self._lookup(digest)
        except Unauthenticated:
            self.verified.forget(digest)
            raise
        self.verified.put(digest, principal, version)
        return principal

    def cached_principal(self, header: str) -> tuple[Principal, bool] | None:
        """The principal of a recently verified token without a database read (None: call
        authenticate), and whether it is due for a background re-read (see VerifiedTokens.get)."""
        digest = _digest(header)
        hit = self.verified.get(digest)
        if hit is None:
            return None
        principal, due = hit
        # A file token stays valid only while its line is there (the file is re-read when it changes).
        if principal.token_id.startswith("file:") and digest not in self.file_tokens():
            self.verified.forget(digest)
            return None
        return principal, due

    def _lookup(self, digest: str) -> Principal:
        rows = self.db.query("SELECT id, project, revoked FROM tokens WHERE token_hash = ?", (digest,))
        if rows:
            if rows[0]["revoked"] is not None:
                raise Unauthenticated("token revoked: ask for a new one (tailor tokens create)")
            return Principal(rows[0]["project"], rows[0]["id"])
        for known, project in self.file_tokens().items():
            if hmac.compare_digest(known, digest):
                return Principal(project, "file:" + known[:12])
        raise Unauthenticated("invalid token")

    @staticmethod
    def _info(r: dict) -> TokenInfo:
        return TokenInfo(r["id"], r["project"], r["name"], r["created"], r["revoked"])

    # --- artifact ownership ---------------------------------------------------------------------
    def own(self, project: str, artifacts: Iterable[tuple[str, str]]) -> None:
        """Record (artifact id, kind) pairs as the project's; recording twice is harmless."""
        now = time.time()
        statements = [
            (
                "INSERT INTO artifact_owners (artifact_id, project, kind, created) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (project, artifact_id) DO NOTHING",
                (artifact_id, project, kind, now),
            )
            for artifact_id, kind in artifacts
            if artifact_id
        ]
        if statements:
            self.db.execute(statements)

    def owns(self, project: str, artifact_id: str) -> bool:
        return bool(
            self.db.query(
                "SELECT 1 AS x FROM artifact_owners WHERE project = ? AND artifact_id = ?",
                (project, artifact_id),
            )
        )

    def owned_starting(self, project: str, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of the project's artifacts that start with `prefix` (tailor_gateway.ids)."""
        from tailor_gateway.ids import prefix_pattern

        rows = self.db.query(
            "SELECT artifact_id FROM artifact_owners WHERE project = ? AND artifact_id LIKE ? "
            "ORDER BY artifact_id LIMIT ?",
            (project, prefix_pattern(prefix), int(limit)),
        )
        return [r["artifact_id"] for r in rows]

    def require_owned(self, project: str, artifact_id: str) -> None:
        # Another project's artifact reads as absent: its existence is not disclosed.
        if not self.owns(project, artifact_id):
            raise NotFound(f"artifact {artifact_id} not found")

    def listing(self, project: str, kind: str = "") -> list[dict]:
        """The project's artifacts, oldest first: id, kind, when it became the project's, and the pipeline
        whose stage made it (from the stages' results; "" for uploads and imports)."""
        sql, args = "SELECT artifact_id, kind, created FROM artifact_owners WHERE project = ?", (project,)
        if kind:
            sql, args = sql + " AND kind = ?", (project, kind)
        rows = self.db.query(sql + " ORDER BY created", args)
        made_by: dict[str, tuple[str, str]] = {}
        for r in self.db.query(
            "SELECT p.id AS pipeline_id, p.name AS pipeline_name, s.results_json FROM stages s "
            "JOIN pipelines p ON p.id = s.pipeline_id WHERE p.project = ? AND s.results_json != '[]' "
            "ORDER BY p.created",
            (project,),
        ):
            for result in json.loads(r["results_json"]):
                made_by.setdefault(result.get("id", ""), (r["pipeline_id"], r["pipeline_name"]))
        return [
            {"id": r["artifact_id"], "kind": r["kind"], "created": r["created"],
             "pipeline": made_by.get(r["artifact_id"], ("", ""))}
            for r in rows
        ]  # fmt: skip

    # --- audit ----------------------------------------------------------------------------------
    def audit(self, who: Principal | None, action: str, target: str = "", **detail) -> None:
        """One row in the audit table and one JSON log line: who did what to which object."""
        who = who or Principal("-", "-")
        now = time.time()
        self.db.execute(
            [
                (
                    "INSERT INTO audit (id, time, project, actor, action, target, detail_json)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (uuid.uuid4().hex, now, who.project, who.token_id, action, target, json.dumps(detail)),
                )
            ]
        )
        log.info(
            "audit %s",
            action,
            extra={
                "fields": {
                    "audit": True,
                    "action": action,
                    "project": who.project,
                    "actor": who.token_id,
                    "target": target,
                    **detail,
                }
            },
        )

    def audit_log(self, project: str | None = None, limit: int = 100) -> list[dict]:
        where, args = ("WHERE project = ?", (project,)) if project else ("", ())
        rows = self.db.query(f"SELECT * FROM audit {where} ORDER BY time DESC LIMIT {int(limit)}", args)
        for r in rows:
            r["detail"] = json.loads(r.pop("detail_json"))
        return rows
