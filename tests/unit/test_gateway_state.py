"""Durable pipeline state, the same code on SQLite and on a real PostgreSQL server: what was committed
survives closing and reopening the database; a racing duplicate submission gets the first pipeline."""

import time

import pytest
from support.postgres import fresh_database, postgres_server

from tailor_gateway import state as st


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "gw.db")
    return fresh_database(request.getfixturevalue("pg_server"))


def _pipeline(pid="p1", key="k1", project="proj"):
    now = time.time()
    return st.PipelineRow(pid, project, "demo", "name: demo", st.PENDING, now, now, idempotency_key=key)


def test_transitions_survive_a_restart(db_url):
    store = st.StateStore(db_url)
    p = _pipeline()
    store.create_pipeline(
        p,
        [
            st.StageRow("p1", "a", "quantize", 0, [], {"method": "nf4"}),
            st.StageRow("p1", "b", "benchmark", 1, ["a"], {}),
        ],
    )
    store.set_stage("p1", "a", state=st.RUNNING, operation_id="op-1", worker="w:1", attempts=1)
    store.set_pipeline("p1", state=st.RUNNING)
    store.close()

    reopened = st.StateStore(db_url)
    assert [x.id for x in reopened.unfinished_pipelines()] == ["p1"]
    stages = reopened.stages("p1")
    assert (stages[0].state, stages[0].operation_id, stages[0].worker) == (st.RUNNING, "op-1", "w:1")
    assert stages[1].depends_on == ["a"] and stages[0].params == {"method": "nf4"}
    assert reopened.find_by_idempotency_key("proj", "k1").id == "p1"
    assert reopened.find_by_idempotency_key("other", "k1") is None
    reopened.set_pipeline("p1", state=st.SUCCEEDED, summary={"recommended": "nf4"})
    assert reopened.get_pipeline("p1").summary == {"recommended": "nf4"}
    assert reopened.get_pipeline("p1").created == pytest.approx(p.created, abs=1e-6)
    assert reopened.unfinished_pipelines() == []


def test_racing_idempotent_submissions_get_one_pipeline(db_url):
    store = st.StateStore(db_url)
    first = store.create_pipeline(_pipeline("p1"), [st.StageRow("p1", "a", "quantize", 0, [], {})])
    twin = store.create_pipeline(_pipeline("p2"), [st.StageRow("p2", "a", "quantize", 0, [], {})])
    assert first.id == twin.id == "p1"
    assert [p.id for p in store.list_pipelines("proj")] == ["p1"]
    assert store.stages("p2") == []  # the loser's stages were rolled back with it
    # The same key in another project is another pipeline.
    other = store.create_pipeline(_pipeline("p3", project="other"), [])
    assert other.id == "p3"


def test_listing_is_bounded_to_the_newest(db_url):
    store = st.StateStore(db_url)
    for i in range(5):
        p = _pipeline(f"p{i}", key=None)
        p.created = p.updated = 1000.0 + i
        store.create_pipeline(p, [])
    assert [p.id for p in store.list_pipelines("proj", limit=2)] == ["p3", "p4"]
    assert len(store.list_pipelines("proj")) == 5 and store.list_pipelines("other") == []


def test_sqlite_reads_on_different_threads_do_not_wait_for_each_other(tmp_path):
    """The token check runs on the event loop: it must not queue behind a database thread's read."""
    import threading

    store = st.StateStore(tmp_path / "gw.db")
    store.create_pipeline(_pipeline(), [])
    entered, release = threading.Event(), threading.Event()

    def slow_read():
        # This thread's own read connection, with a function that holds its query until released.
        store.db._reader().create_function("hold", 0, lambda: entered.set() or release.wait(30) or 1)
        store.db.query("SELECT hold() AS x")

    holder = threading.Thread(target=slow_read)
    holder.start()
    try:
        assert entered.wait(30)
        # Another thread's read answers while the first is still inside its query.
        assert store.get_pipeline("p1").id == "p1"
        assert holder.is_alive()
    finally:
        release.set()
        holder.join(30)
        store.close()
