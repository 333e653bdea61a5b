"""Matplotlib without a display: every figure the framework writes (study plots, prediction figures,
scan panels) is drawn headless, on clusters and in DDP workers alike."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use: matplotlib is
    slow to import and most runs draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
