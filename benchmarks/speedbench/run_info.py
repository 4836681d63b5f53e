"""What every speed report records about its run (the workload, the machine, the versions) and the
progress messages a run prints on stderr."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .workloads import model_shape


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def workload_settings(
    args: argparse.Namespace, description: str, model: nn.Module, device: torch.device
) -> dict[str, Any]:
    """The settings fields that open every report: workload, model, its shape, device and dtype."""
    return {
        "workload": args.workload,
        "model": description,
        "shape": model_shape(model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
    }


def runtime_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings fields that close every report: threads, seed and the torch and Python versions."""
    return {
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)
