"""What a benchmark ran on: CPU/GPU names, core count, library versions, and a file-name slug."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def device_name(info: dict | None = None) -> str:
    info = info or machine()
    return info["gpu"] or info["cpu"]


def versions() -> dict:
    import numpy
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
