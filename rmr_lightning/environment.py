"""What a run ran on: package versions, CPU and its vector unit, threads, GPU.

Seeded runs reproduce bit for bit on the same machine type with the same thread count. On another CPU
(AVX-512 against AVX2, say) or with other package versions the floating-point sums differ in their
last bits and the differences grow over training, so each run's numbers are a few percent away from
another machine's. Recording this beside every result says which comparison is which.
"""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_FILE = "environment.json"
# The packages whose arithmetic or defaults reach a result (data, rendering, training).
PACKAGES = (
    "torch",
    "lightning",
    "torch-geometric",
    "torchio",
    "numpy",
    "scipy",
    "nibabel",
    "nilearn",
    "SimpleITK",
    "jsonargparse",
)


@cache  # fixed for the life of the process; read once however many runs a process makes
def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; ``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@cache
def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_environment() -> dict[str, Any]:
    """A JSON-able description of this process's machine and software (no host or user names)."""
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "packages": {name: _package_version(name) for name in PACKAGES},
    }
