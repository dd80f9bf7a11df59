"""A benchmark report's headline numbers, under the names the whole platform uses. Pure: no torch, no protos.

The servicer reports them as the operation's metrics; the selector and the CLI read them from report files.
The keys of the report are known in one place, `tailor_runtime.benchmark_report`; this is its
`BenchmarkReport.headline()` for a caller holding the report as a dict.
"""

from __future__ import annotations

from typing import Any

from tailor_runtime.benchmark_report import BenchmarkReport


def headline_metrics(result: dict[str, Any] | BenchmarkReport) -> dict[str, Any]:
    """`BenchmarkReport.headline()` of a report (or its dict: InvalidArgument naming a field that does not fit)."""
    report = result if isinstance(result, BenchmarkReport) else BenchmarkReport.parse(result)
    return report.headline()
