"""The machine a worker runs on, as reported in capability listings and benchmark reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from tailor.common.v1 import common_pb2 as common


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def describe(environment: dict) -> str:
    """One line naming what a measurement ran on, from a benchmark report's environment block."""
    versions = environment.get("versions") or {}
    threads = (environment.get("threads") or {}).get("torch_intra_op")
    parts = [
        environment.get("cpu_model") or "unknown CPU",
        f"{int(environment.get('cpus_usable') or environment.get('cpu_count') or 0) or '?'} cores",
        f"{int(threads)} torch thread(s)" if threads else "",
        f"torch {versions['torch']}" if versions.get("torch") else "",
        f"transformers {versions['transformers']}" if versions.get("transformers") else "",
    ]
    return ", ".join(p for p in parts if p)


def hardware_profile() -> common.HardwareProfile:
    # Accelerators are reported by the services that use them (torch.cuda), not probed here: the
    # gateway and the selector must not import torch.
    return common.HardwareProfile(
        name=platform.node(), cpu_model=cpu_model(), cpu_cores=os.cpu_count() or 0, memory_gb=memory_gb()
    )
