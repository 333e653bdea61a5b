"""Two CPU processes (gloo): ranks see disjoint subjects, metrics sync, rank 0 alone writes artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import REPO, TINY_PRETRAIN, rmr, tiny_natural

DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false"]


def test_natural_ddp_ranks_see_disjoint_subjects(tiny_artifact: Path, tmp_path: Path) -> None:
    probe = {"class_path": "ddp_probe.RecordSubjects", "init_args": {"dirpath": str(tmp_path / "seen")}}
    args = [
        "fit", "--config", "configs/natural/brain_mri.yaml", *tiny_natural(tiny_artifact),
        "--data.init_args.batch_size=1", "--trainer.max_epochs=2", "--trainer.max_steps=-1",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks=[{json.dumps(probe)}]", *DDP,
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = rmr(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / "seen" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in ranks)
        a, b = (set(r["subjects"]) for r in ranks)
        assert a and b and not a & b, (a, b)  # disjoint
        assert len(a | b) == 4  # together they cover the training set


def test_pretraining_ddp_completes_and_rank_zero_writes_the_artifact(tmp_path: Path) -> None:
    callbacks = [{"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": str(tmp_path)}}]
    args = [
        "fit", "--config", "configs/pretrain/ndm.yaml", *TINY_PRETRAIN, "--trainer.max_steps=4",
        "--trainer.val_check_interval=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks={json.dumps(callbacks)}", *DDP,
    ]  # fmt: skip
    result = rmr(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "processor.pt").is_file()
    curve = (tmp_path / "val_curve.csv").read_text().splitlines()
    assert curve[0] == "step,seconds,train_seconds,val_r2_delta" and len(curve) == 3  # one writer, two validations
