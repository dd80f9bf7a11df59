"""SelectorService: proto in, `select()`, proto out. Answers directly; no torch."""

from __future__ import annotations

import math

from tailor.common.v1 import common_pb2 as common
from tailor.selector.v1 import selector_service_pb2 as pb
from tailor.selector.v1 import selector_service_pb2_grpc as pb_grpc
from tailor_runtime import metrics_catalogue as mc
from tailor_runtime.errors import InvalidArgument
from tailor_selector.selection import AT_LEAST, AT_MOST, Candidate, Constraint, Objective, select

_COMPARISONS = {common.COMPARISON_AT_MOST: AT_MOST, common.COMPARISON_AT_LEAST: AT_LEAST}


def constraint_from_proto(c: common.Constraint) -> Constraint:
    if c.comparison not in _COMPARISONS:
        raise InvalidArgument(
            f"constraint on {c.metric!r} needs a comparison",
            choices=("COMPARISON_AT_MOST", "COMPARISON_AT_LEAST"),
        )
    return Constraint(c.metric, _COMPARISONS[c.comparison], c.value)


class SelectorServicer(pb_grpc.SelectorServiceServicer):
    async def Select(self, request: pb.SelectRequest, context) -> pb.SelectResponse:
        candidates = [
            Candidate(c.id, c.name or c.id, dict(c.metrics), c.is_baseline) for c in request.candidates
        ]
        constraints = [constraint_from_proto(c) for c in request.constraints]
        # proto3 cannot tell an unset `maximize` from False: a metric the catalogue maximizes (tokens/s,
        # agreement) is maximized either way; nobody asks for fewer tokens per second.
        objectives = [
            Objective(o.metric, o.maximize or mc.higher_is_better(o.metric), o.weight or 1.0)
            for o in request.objectives
        ]
        result = (
            select(candidates, constraints, objectives) if objectives else select(candidates, constraints)
        )
        return pb.SelectResponse(
            recommended_id=result.recommended.id if result.recommended else "",
            pareto_front_ids=[c.id for c in result.pareto_front],
            verdicts=[
                pb.Verdict(
                    candidate_id=v.candidate.id,
                    feasible=v.feasible,
                    pareto_optimal=v.pareto_optimal,
                    score=v.score if math.isfinite(v.score) else 0.0,
                    metrics=v.candidate.metrics,
                    violations=[
                        pb.Violation(metric=x.metric, limit=x.limit, actual=x.actual, excess=x.excess)
                        for x in v.violations
                    ],
                )
                for v in result.verdicts
            ],
            rationale=result.rationale,
        )


def register(server, ctx) -> list[str]:
    pb_grpc.add_SelectorServiceServicer_to_server(SelectorServicer(), server)
    return [pb.DESCRIPTOR.services_by_name["SelectorService"].full_name]
