"""Durable pipeline state: what was committed survives closing and reopening the database."""

import time

from tailor_gateway import state as st


def test_transitions_survive_a_restart(tmp_path):
    db = tmp_path / "gw.db"
    store = st.StateStore(db)
    now = time.time()
    p = st.PipelineRow("p1", "proj", "demo", "name: demo", st.PENDING, now, now, idempotency_key="k1")
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

    reopened = st.StateStore(db)
    assert [x.id for x in reopened.unfinished_pipelines()] == ["p1"]
    stages = reopened.stages("p1")
    assert (stages[0].state, stages[0].operation_id, stages[0].worker) == (st.RUNNING, "op-1", "w:1")
    assert stages[1].depends_on == ["a"] and stages[0].params == {"method": "nf4"}
    assert reopened.find_by_idempotency_key("proj", "k1").id == "p1"
    assert reopened.find_by_idempotency_key("other", "k1") is None
    reopened.set_pipeline("p1", state=st.SUCCEEDED, summary={"recommended": "nf4"})
    assert reopened.get_pipeline("p1").summary == {"recommended": "nf4"}
    assert reopened.unfinished_pipelines() == []
