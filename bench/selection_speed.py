"""How long the selector takes over many candidates (pure Python, no torch): the timing that
tests/unit/test_selection.py does not assert (no wall-clock assertion in a test).

    .venv/bin/python bench/selection_speed.py [--candidates 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "services" / "selector"), str(ROOT / "runtime"), str(ROOT / "gen")]

from tailor_selector.selection import Candidate, Constraint, select  # noqa: E402


def candidates(n: int, seed: int = 0) -> list[Candidate]:
    rng = random.Random(seed)
    return [
        Candidate(
            str(i),
            str(i),
            {
                "perplexity": rng.uniform(3, 6),
                "size_mb": rng.uniform(0.1, 2),
                "latency_ms_per_token": rng.uniform(0.5, 3),
            },
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cands = candidates(args.candidates)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = select(cands, [Constraint("size_mb", "at_most", 1.5)])
        seconds.append(time.perf_counter() - started)
        assert result.recommended is not None
    print(
        json.dumps(
            {
                "candidates": args.candidates,
                "median_s": round(statistics.median(seconds), 4),
                "max_s": round(max(seconds), 4),
                "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
