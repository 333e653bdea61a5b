"""Callbacks for the DDP tests: each rank writes what it trained on and which scans it read (test helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordSubjects(L.Callback):
    """Per rank and training epoch: the subjects of its training batches."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.seen: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(list(batch.subject_ids))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "subjects": sum(self.seen, [])}))
        self.seen = []


class RecordScanReads(RecordSubjects):
    """Also, per rank: the scans it preprocessed into the cache (from this callback's creation, which is
    before the CLI validates the data) and the cached scans it read while training, per epoch."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath)
        from datamodules.manifest import CachedScans
        from datamodules.scan_cache import ScanCache

        self.builds: list[str] = []
        self.reads: list[str] = []
        self.trainer = None
        build, get = ScanCache.build, CachedScans.__getitem__

        def counted_build(cache, source):
            self.builds.append(source.image.name)
            return build(cache, source)

        def counted_get(dataset, index):
            if self.trainer is not None and self.trainer.training and not self.trainer.sanity_checking:
                self.reads.append(dataset.rows[index].subject_id)
            return get(dataset, index)

        ScanCache.build, CachedScans.__getitem__ = counted_build, counted_get  # this test process only

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        path = self.dirpath / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}_reads.json"
        path.write_text(json.dumps({"builds": self.builds, "reads": self.reads}))
        self.reads = []
