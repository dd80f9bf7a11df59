"""Tokens (hashed, scoped, revocable at once), artifact ownership, the audit log and rate limits,
on SQLite and on a real PostgreSQL server."""

import asyncio
import json
import logging

import grpc
import pytest
from support.postgres import fresh_database, postgres_server

from tailor_gateway.access import Access, token_hash
from tailor_gateway.auth import current_caller, gateway_auth_check
from tailor_gateway.ratelimit import RateLimited, RateLimiter
from tailor_gateway.state import StateStore
from tailor_runtime.errors import InvalidArgument, NotFound, Unauthenticated


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def access(request, tmp_path):
    url = (
        str(tmp_path / "gw.db")
        if request.param == "sqlite"
        else fresh_database(request.getfixturevalue("pg_server"))
    )
    return Access(StateStore(url).db)


def test_tokens_are_hashed_scoped_and_revocable_at_once(access):
    token, info = access.create_token("team-a", "ci")
    assert access.authenticate(f"Bearer {token}").project == "team-a"
    rows = access.db.query("SELECT * FROM tokens")
    assert token not in json.dumps(rows) and rows[0]["token_hash"] == token_hash(token)
    access.revoke_token(info.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        access.authenticate(f"Bearer {token}")
    with pytest.raises(Unauthenticated):
        access.authenticate("Bearer tlr_guess")
    with pytest.raises(Unauthenticated, match="missing"):
        access.authenticate("")
    with pytest.raises(NotFound):
        access.revoke_token("nope")
    with pytest.raises(InvalidArgument):
        access.create_token("../other")
    assert [t.revoked is not None for t in access.list_tokens("team-a")] == [True]


def test_file_tokens_still_work(tmp_path):
    access = Access(StateStore(tmp_path / "gw.db").db, lambda: {token_hash("tlr_file"): "default"})
    assert access.authenticate("Bearer tlr_file").project == "default"


def test_artifacts_are_owned_per_project(access):
    access.own("team-a", [("a" * 64, "model"), ("b" * 64, "dataset")])
    access.own("team-a", [("a" * 64, "model")])  # twice is harmless
    access.own("team-b", [("a" * 64, "model")])  # same content uploaded by another project
    assert access.owns("team-a", "b" * 64) and not access.owns("team-b", "b" * 64)
    with pytest.raises(NotFound):
        access.require_owned("team-b", "b" * 64)
    assert [(a["id"], a["kind"]) for a in access.listing("team-a", "model")] == [("a" * 64, "model")]
    assert len(access.listing("team-a")) == 2


def test_an_artifacts_listing_names_the_pipeline_that_made_it(tmp_path):
    from tailor_gateway.state import PipelineRow, StageRow

    state = StateStore(str(tmp_path / "gw.db"))
    access = Access(state.db)
    made, uploaded = "c" * 64, "d" * 64
    state.create_pipeline(
        PipelineRow("p1", "team-a", "nf4-try", "name: nf4-try", "SUCCEEDED", 1.0, 1.0),
        [StageRow("p1", "quantize/nf4", "quantize", 0, [], {})],
    )
    state.set_stage("p1", "quantize/nf4", results=[{"id": made, "kind": "model"}])
    state.create_pipeline(  # another project's pipeline that made the same bytes names nothing here
        PipelineRow("p2", "team-b", "theirs", "name: theirs", "SUCCEEDED", 0.5, 0.5),
        [StageRow("p2", "quantize/nf4", "quantize", 0, [], {})],
    )
    state.set_stage("p2", "quantize/nf4", results=[{"id": made, "kind": "model"}])
    access.own("team-a", [(uploaded, "dataset"), (made, "model")])
    listed = {a["id"]: a for a in access.listing("team-a")}
    assert listed[made]["pipeline"] == ("p1", "nf4-try") and listed[uploaded]["pipeline"] == ("", "")
    assert listed[made]["created"] > 0


def test_audit_rows_and_json_log_lines(access, caplog):
    token, info = access.create_token("team-a")
    who = access.authenticate(f"Bearer {token}")
    with caplog.at_level(logging.INFO, logger="tailor.audit"):
        access.audit(who, "pipeline.create", "p1", name="demo")
        access.audit(who, "pipeline.cancel", "p1")
    rows = access.audit_log("team-a")
    assert [r["action"] for r in rows] == ["pipeline.cancel", "pipeline.create"]
    assert rows[1]["actor"] == info.id and rows[1]["detail"] == {"name": "demo"}
    assert access.audit_log("team-b") == []
    fields = [r.fields for r in caplog.records if hasattr(r, "fields")]
    expected = {"audit": True, "action": "pipeline.create", "project": "team-a", "actor": info.id}
    assert expected.items() <= fields[0].items()
    assert token not in caplog.text


def test_rate_limit_token_bucket_with_retry_hint():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("t1")
    with pytest.raises(RateLimited) as err:
        limiter.check("t1")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.trailers == (("retry-after-ms", "500"),) and "retry after 500 ms" in err.value.message
    limiter.check("t2")  # per token: another token is not affected
    now[0] += 0.5
    limiter.check("t1")  # refilled one
    RateLimiter(rate=0, burst=1).check("t1")  # 0 disables


def test_gateway_check_sets_the_caller(tmp_path):
    access = Access(StateStore(tmp_path / "gw.db").db)
    token, info = access.create_token("team-a")
    check = gateway_auth_check(access, RateLimiter(rate=1.0, burst=1))

    async def main():
        first = check("/x", {"authorization": f"Bearer {token}"})
        # Not yet verified: an awaitable, the database read on a thread; then cached.
        assert asyncio.iscoroutine(first) and await first == "team-a"
        assert current_caller.get().token_id == info.id
        with pytest.raises(RateLimited):  # the cached path, answered at once, is rate limited too
            check("/x", {"authorization": f"Bearer {token}"})

    asyncio.run(main())
