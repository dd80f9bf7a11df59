"""The token cache: hits answer without the database, revocations are seen at the next call (same
process, and another process on the same SQLite file), other revocations within the TTL; over real gRPC
the database read of a new token runs off the event loop."""

import asyncio
import subprocess
import sys
import threading

import grpc
import pytest
from support.postgres import fresh_database, postgres_server

from tailor_gateway.access import Access, Principal, token_hash
from tailor_gateway.auth import gateway_auth_check
from tailor_gateway.ratelimit import RateLimiter
from tailor_gateway.state import StateStore
from tailor_gateway.tokens import TOKEN_CACHE_TTL_S, VerifiedTokens
from tailor_runtime.errors import Unauthenticated
from tailor_runtime.interceptors import ServerInterceptor, current_principal


class CountingQueries:
    """The real database, counting token reads and the threads they ran on."""

    def __init__(self, db):
        self.db, self.token_reads, self.threads = db, 0, set()

    def __getattr__(self, name):
        return getattr(self.db, name)

    def query(self, sql, args=()):
        if "FROM tokens WHERE token_hash" in sql:
            self.token_reads += 1
            self.threads.add(threading.get_ident())
        return self.db.query(sql, args)


def test_a_cached_token_needs_no_database_read(tmp_path):
    access = Access(StateStore(tmp_path / "gw.db").db)
    token, _ = access.create_token("team-a")
    access.db = counting = CountingQueries(access.db)
    header = f"Bearer {token}"
    assert access.cached_principal(header) is None
    access.authenticate(header)
    assert [access.cached_principal(header)[0].project for _ in range(5)] == ["team-a"] * 5
    assert counting.token_reads == 1


def test_a_revocation_by_another_process_on_sqlite_is_seen_at_the_next_call(tmp_path):
    db_path = tmp_path / "gw.db"
    access = Access(StateStore(db_path).db)
    token, info = access.create_token("team-a")
    header = f"Bearer {token}"
    access.authenticate(header)
    assert access.cached_principal(header) is not None
    # What `tailor tokens revoke` does: its own process, its own connection, the same file.
    script = (
        "import sys; from tailor_gateway.access import Access; from tailor_gateway.state import StateStore;"
        "Access(StateStore(sys.argv[1]).db).revoke_token(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, str(db_path), info.id], check=True)
    assert access.cached_principal(header) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        access.authenticate(header)


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as url:
        yield url


def test_on_postgresql_a_revocation_elsewhere_takes_effect_within_the_ttl(pg_server):
    url = fresh_database(pg_server)
    now = [0.0]
    gateway, cli = Access(StateStore(url).db), Access(StateStore(url).db)
    gateway.verified = VerifiedTokens(None, clock=lambda: now[0])
    token, info = cli.create_token("team-a")
    header = f"Bearer {token}"
    gateway.authenticate(header)
    cli.revoke_token(info.id)
    # No marker file to tell the gateway: the cached answer stands, but never past the TTL.
    assert gateway.cached_principal(header) is not None
    now[0] += TOKEN_CACHE_TTL_S
    assert gateway.cached_principal(header) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        gateway.authenticate(header)
    # In the revoking process itself, at once.
    token2, info2 = cli.create_token("team-a")
    cli.authenticate(f"Bearer {token2}")
    cli.revoke_token(info2.id)
    assert cli.cached_principal(f"Bearer {token2}") is None


def test_a_read_that_began_before_a_revocation_is_not_cached(tmp_path):
    marker = tmp_path / "gw.db.tokens-revoked"
    gateway, revoker = VerifiedTokens(marker), VerifiedTokens(marker)
    principal = Principal("team-a", "t1")
    before = gateway.version()
    revoker.invalidate()  # another process, between the gateway's read and its put
    gateway.put("d", principal, before)
    assert gateway.get("d") is None
    before = gateway.version()
    gateway.invalidate()  # this process
    gateway.put("d", principal, before)
    assert gateway.get("d") is None
    gateway.put("d", principal, gateway.version())
    assert gateway.get("d") == (principal, False)


def test_a_busy_token_is_due_for_one_background_reread(tmp_path):
    now = [0.0]
    cache = VerifiedTokens(None, ttl_s=4.0, clock=lambda: now[0])
    principal = Principal("team-a", "t1")
    cache.put("d", principal, cache.version())
    assert cache.get("d") == (principal, False)
    now[0] = 2.5
    assert cache.get("d") == (principal, True)
    assert cache.get("d") == (principal, False)  # asked once
    now[0] = 4.0
    assert cache.get("d") is None


def test_a_file_token_is_refused_once_its_line_is_gone(tmp_path):
    from tailor_gateway.tokens import TokenFile

    path = tmp_path / "tokens"
    path.write_text(f"{token_hash('tlr_file')} default\n")
    access = Access(StateStore(tmp_path / "gw.db").db, TokenFile(path).hashes)
    access.authenticate("Bearer tlr_file")
    assert access.cached_principal("Bearer tlr_file")[0].project == "default"
    path.write_text("# emptied\n")
    assert access.cached_principal("Bearer tlr_file") is None


def test_over_grpc_the_token_read_runs_off_the_event_loop_and_revocation_is_seen(tmp_path):
    db_path = tmp_path / "gw.db"
    access = Access(StateStore(db_path).db)
    token, info = access.create_token("team-a")
    access.db = counting = CountingQueries(access.db)

    async def whoami(request, context):
        return current_principal.get().encode()

    async def main():
        check = gateway_auth_check(access, RateLimiter(rate=0, burst=1))
        server = grpc.aio.server(interceptors=[ServerInterceptor("gateway", check)])
        handler = grpc.unary_unary_rpc_method_handler(whoami)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"Who": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop_thread = threading.get_ident()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                who = channel.unary_unary("/t.T/Who")
                meta = [("authorization", f"Bearer {token}")]
                assert [await who(b"", metadata=meta) for _ in range(3)] == [b"team-a"] * 3
                assert counting.token_reads == 1 and loop_thread not in counting.threads
                script = (
                    "import sys; from tailor_gateway.access import Access;"
                    "from tailor_gateway.state import StateStore;"
                    "Access(StateStore(sys.argv[1]).db).revoke_token(sys.argv[2])"
                )
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", script, str(db_path), info.id
                )
                assert await proc.wait() == 0
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await who(b"", metadata=meta)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await who(b"", metadata=[("authorization", "Bearer tlr_guess")])
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())
