"""What every bench script records beside its numbers: the machine and the library versions."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def machine_info(device: str) -> dict:
    import transformers

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def write_result(name: str, device: str, payload: dict, model: str | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    model_part = f"-{slug(model)}" if model else ""
    path = RESULTS_DIR / f"{name}{model_part}-{kind}-{slug(device_name(device))}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
