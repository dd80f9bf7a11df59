"""`tailor tokens` and `tailor audit`: operator commands run against the gateway's database directly.

They need what the gateway needs to reach its state (TAILOR_STATE_URL for PostgreSQL, TAILOR_STATE_DB or
the local stack's <state>/gateway.db for SQLite): whoever can reach the database administers tokens.
A new token is printed once; only its sha256 is stored. A revoked token is refused at its next request.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tailor_gateway.access import Access, Principal
from tailor_gateway.state import StateStore

console = Console()


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def open_access(args) -> Access:
    url = args.db or os.environ.get("TAILOR_STATE_URL") or os.environ.get("TAILOR_STATE_DB")
    return Access(StateStore(url or Path(args.state_dir) / "gateway.db").db)


def cmd_tokens(args) -> int:
    access = open_access(args)
    operator = f"cli:{os.environ.get('USER', 'operator')}"
    if args.action == "create":
        token, info = access.create_token(args.project, args.name)
        access.audit(Principal(info.project, operator), "token.create", info.id, name=info.name)
        if args.quiet:
            print(token)
        else:
            console.print(f"token {info.id} for project {info.project} (shown once, keep it secret):")
            print(token)
        return 0
    if args.action == "revoke":
        info = access.revoke_token(args.id)
        access.audit(Principal(info.project, operator), "token.revoke", info.id)
        console.print(f"token {info.id} of project {info.project} revoked at {_when(info.revoked)}")
        return 0
    table = Table(title="API tokens (hashes only are stored)")
    for col in ("id", "project", "name", "created", "revoked"):
        table.add_column(col)
    for t in access.list_tokens(args.project or None):
        table.add_row(t.id, t.project, t.name, _when(t.created), _when(t.revoked))
    console.print(table)
    return 0


def cmd_audit(args) -> int:
    rows = open_access(args).audit_log(args.project or None, args.limit)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    table = Table(title="audit log (newest first)")
    for col in ("time", "project", "actor", "action", "target"):
        table.add_column(col)
    for r in rows:
        table.add_row(_when(r["time"]), r["project"], r["actor"], r["action"], r["target"])
    console.print(table)
    return 0


def add_parsers(sub) -> None:
    tokens = sub.add_parser("tokens", help="API tokens (operators: needs the gateway's database)")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new token for a project, printed once")
    create.add_argument("--project", required=True)
    create.add_argument("--name", default="", help="what the token is for")
    create.add_argument("--quiet", action="store_true", help="print only the token")
    actions.add_parser("revoke", help="revoke a token at once").add_argument("id")
    actions.add_parser("list", help="tokens (never their secrets)").add_argument("--project", default="")
    audit = sub.add_parser("audit", help="who did what (operators: needs the gateway's database)")
    audit.add_argument("--project", default="")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--json", action="store_true")
    for p in (tokens, audit):
        p.add_argument("--db", default=None, help="postgresql://... or a SQLite path (default: the stack's)")
