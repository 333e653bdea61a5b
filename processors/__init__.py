"""Plug-in processors ``P``: one contract (``base.Processor``), one family per file."""

from processors.base import Processor
from processors.gatv2 import GATv2Processor
from processors.mlp import MLPProcessor
from processors.mpnn import MaxMPNNProcessor, MPNNProcessor
from processors.registry import ENTRY_POINT_GROUP, available_processors, resolve_processor

__all__ = [
    "ENTRY_POINT_GROUP",
    "GATv2Processor",
    "MLPProcessor",
    "MPNNProcessor",
    "MaxMPNNProcessor",
    "Processor",
    "available_processors",
    "resolve_processor",
]
