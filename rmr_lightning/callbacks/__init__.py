"""The Lightning callbacks of rmr_lightning; ``rmr_lightning.callbacks.<Class>`` is the class path configs use."""

from rmr_lightning.callbacks.artifacts import PretrainingArtifacts
from rmr_lightning.callbacks.run_identity import RunIdentity
from rmr_lightning.callbacks.save_config import SaveAndLogConfig
from rmr_lightning.callbacks.scan_slices import LogScanSlices

__all__ = ["LogScanSlices", "PretrainingArtifacts", "RunIdentity", "SaveAndLogConfig"]
