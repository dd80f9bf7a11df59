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


def hardware_profile() -> common.HardwareProfile:
    # Accelerators are reported by the services that use them (torch.cuda), not probed here: the
    # gateway and the selector must not import torch.
    return common.HardwareProfile(
        name=platform.node(), cpu_model=cpu_model(), cpu_cores=os.cpu_count() or 0, memory_gb=memory_gb()
    )
