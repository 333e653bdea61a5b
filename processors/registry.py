"""Short names for processors, registered through the entry-point group ``rmr_lightning.processors``.

A third-party package adds one with, in its ``pyproject.toml``::

    [project.entry-points."rmr_lightning.processors"]
    my_gnn = "my_package.module:MyProcessor"

No list of names lives in code: the installed entry points are the registry.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from processors.base import Processor

ENTRY_POINT_GROUP = "rmr_lightning.processors"


def available_processors() -> dict[str, EntryPoint]:
    """Registered short names -> entry points (read afresh, so new installs are seen)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_processor(name: str) -> type[Processor]:
    """The processor class registered under ``name``, or named by its import path (``my_pkg.MyProcessor``
    or ``my_pkg:MyProcessor``); the error lists the valid names."""
    registry = available_processors()
    if name in registry:
        cls = registry[name].load()
    elif "." in name or ":" in name:
        module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"processor {name!r}: cannot import it ({type(e).__name__}: {e})") from None
    else:
        raise ValueError(
            f"unknown processor {name!r}; registered names: {sorted(registry)} "
            f"(or give the import path of any Processor subclass, e.g. my_pkg.MyProcessor)"
        )
    if not (isinstance(cls, type) and issubclass(cls, Processor)):
        raise TypeError(f"processor {name!r} -> {cls!r} is not a subclass of processors.base.Processor")
    return cls
