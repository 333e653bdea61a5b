"""A callback for the DDP test: each rank writes the subjects it trained on (test helper)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordSubjects(L.Callback):
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
