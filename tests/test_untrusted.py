"""Untrusted files and identifiers, end to end through ``rmr``: no code runs from a checkpoint, a damaged
checkpoint is named or passed over, a non-finite loss stops the fit before a checkpoint holds it, a failed
validation leaves nothing behind, and no identifier planted in paths or DICOM tags reaches any file a run
writes (W&B offline, CSV logs, config, predictions, reports)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
import torchio as tio

from datamodules.manifest import BAD_SUBJECTS_FILE, dk84_region_names
from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.checkpoints import CheckpointError
from rmr_lightning.cli import cli_main
from rmr_lightning.guards import NonFiniteError
from tests.helpers import TINY_PRETRAIN, rmr, tiny_model, tiny_natural
from tests.test_manifest import GRID, slab_labels, write_manifest, write_nifti

SENTINEL = "ZZDOE4711"  # a patient's name and record number, as exports put them in folders and tags
BRAIN = ["--config", "configs/natural/brain_mri.yaml", "--trainer.enable_progress_bar=false"]


class Marker:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class PoisonWeights(L.Callback):
    """Turns one encoder weight into NaN before the second training batch, as a diverging step would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


def _finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---- checkpoints ---------------------------------------------------------------------------------------


def test_a_pickled_object_in_a_checkpoint_never_runs(tiny_artifact: Path, tmp_path: Path) -> None:
    """The two routes of the issue: fit --ckpt_path last and predict --ckpt_path best read a planted file."""
    marker, args = tmp_path / "pwned", [*BRAIN, *tiny_natural(tiny_artifact), "--trainer.logger=false"]
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "callbacks": {}, "note": Marker(marker)}, tmp_path / "checkpoints" / "last.ckpt")
    for subcommand, ckpt in (
        ("fit", "last"),
        ("predict", "best"),
        ("test", str(tmp_path / "checkpoints" / "last.ckpt")),
    ):
        with pytest.raises(
            CheckpointError, match=rf"{tmp_path / 'checkpoints' / 'last.ckpt'}: not a readable checkpoint"
        ):
            cli_main(
                [
                    subcommand,
                    *args,
                    f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.max_steps=1",
                    "--ckpt_path",
                    ckpt,
                ]
            )
    assert not marker.exists()


def test_a_cut_short_last_checkpoint_is_passed_over_for_the_newest_intact_one(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    args = [
        *BRAIN,
        *tiny_natural(tiny_artifact),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.val_check_interval=2",
    ]
    fit = cli_main(["fit", *args, "--trainer.max_steps=4"])
    best, last = Path(fit.trainer.checkpoint_callback.best_model_path), tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a job killed while saving
    with pytest.warns(
        UserWarning,
        match=rf"passing over damaged checkpoints \({last}: not a readable checkpoint.*resuming from {best}",
    ):
        resumed = cli_main(["fit", *args, "--trainer.max_steps=6", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(best) and resumed.trainer.global_step == 6
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'cut.ckpt'}: not a readable checkpoint"):
        (tmp_path / "cut.ckpt").write_bytes(best.read_bytes()[:1000])
        cli_main(["fit", *args, "--trainer.max_steps=8", "--ckpt_path", str(tmp_path / "cut.ckpt")])


def test_a_non_finite_loss_stops_the_fit_naming_the_batch_before_any_checkpoint_holds_it(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    callbacks = [
        {"class_path": "tests.test_untrusted.PoisonWeights"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 1},
        },
    ]
    args = [
        *BRAIN,
        *tiny_natural(tiny_artifact),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=4",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]
    with pytest.raises(NonFiniteError, match=r"train loss is nan at step 1 on the batch of subject\(s\) \S+"):
        cli_main(["fit", *args])
    written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert written and all(_finite(p) for p in written)  # step 1's checkpoint is there, and clean


# ---- honest budgets ------------------------------------------------------------------------------------


def test_pretraining_stopped_by_max_time_says_so_and_its_artifact_warns(tmp_path: Path) -> None:
    artifacts = [
        {"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": str(tmp_path)}}
    ]
    with pytest.warns(UserWarning, match=r"pretraining ran \d+ of 100000 planned steps \(stopped by max_time\)"):
        cli_main(
            [
                "fit",
                "--config",
                "configs/pretrain/ndm.yaml",
                *TINY_PRETRAIN,
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_steps=100000",
                "--trainer.max_time={'seconds': 3}",
                "--trainer.val_check_interval=null",
                "--trainer.check_val_every_n_epoch=1",
                f"--trainer.callbacks={json.dumps(artifacts)}",
            ]
        )
    stats = json.loads((tmp_path / "fit_stats.json").read_text())
    assert stats["stopped_by"] == "max_time" and 0 < stats["completed_steps"] < stats["planned_steps"] == 100000
    with pytest.warns(UserWarning, match=r"of 100000 planned steps \(stopped by max_time\)"):
        artifact = load_processor_artifact(tmp_path / "processor.pt")
    assert artifact.metrics["completed_steps"] == stats["completed_steps"]


# ---- identifiers ---------------------------------------------------------------------------------------


def _dicom_series(folder: Path, slices: int = 8) -> Path:
    """pydicom's MR_small as a 2 mm series whose PatientName and PatientID are the sentinel."""
    source = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    folder.mkdir(parents=True)
    for k in range(slices):
        ds = source.copy()
        ds.PatientName, ds.PatientID = f"{SENTINEL}^JANE", SENTINEL
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 2.0
        ds.ImagePositionPatient = [-64.0, -64.0, -8.0 + 2.0 * k]
        ds.InstanceNumber, ds.SOPInstanceUID = k + 1, f"{source.SOPInstanceUID}.{k + 1}"
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def _cohort(folder: Path, spoil_nan: bool) -> Path:
    """Seven subjects, each in a folder named by the sentinel, one a DICOM series, one with a NaN voxel."""
    names, rows = dk84_region_names(), []
    for i in range(7):
        subject = folder / "scans" / f"{SENTINEL}_{i:02d}"
        rng = np.random.default_rng(i)
        if i == 0:
            series = _dicom_series(subject / "t1")
            image = tio.ScalarImage(series)
            labels = torch.as_tensor(slab_labels(image.spatial_shape))[None]
            tio.LabelMap(tensor=labels, affine=image.affine).save(subject / "dk.nii.gz")
            paths = (series, subject / "dk.nii.gz")
        else:
            data = rng.normal(100, 20, GRID).astype(np.float32)
            if i == 3 and spoil_nan:
                data[4, 4, 4] = np.nan
            paths = (write_nifti(subject / "t1.nii.gz", data), write_nifti(subject / "dk.nii.gz", slab_labels(GRID)))
        rows.append(
            {
                "subject_id": f"sub-{i:02d}",
                "image": str(paths[0].relative_to(folder)),
                "label_map": str(paths[1].relative_to(folder)),
                "age": 70 + i,
                "horizon": 1.0,
            }
            | {n: float(rng.uniform(0, 0.2)) for n in names}
        )
    return write_manifest(folder / "manifest.csv", rows)


def _manifest_args(manifest: Path, root: Path, artifact: Path, **data: str) -> list[str]:
    loggers = [
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(root), "project": "rmr"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "csv"}},
    ]
    return [
        "--config",
        "configs/natural/manifest.yaml",
        *tiny_model(artifact),
        f"--data.init_args.manifest={manifest}",
        "--data.init_args.spacing=4",
        "--data.init_args.shape=[6,6,4]",
        "--data.init_args.loader.batch_size=2",
        *[f"--data.init_args.{k}={v}" for k, v in data.items()],
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger={json.dumps(loggers)}",
        "--trainer.enable_progress_bar=false",
    ]


def _files_holding(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.lower().encode() in p.read_bytes().lower()]


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_no_identifier_reaches_any_file_of_a_failed_or_a_successful_run(tiny_artifact: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # failed: the NaN scan is an error; the console names it in full, and no run folder appears
    manifest = _cohort(tmp_path / "bad", spoil_nan=True)
    failed = rmr(["fit", *_manifest_args(manifest, tmp_path / "failed_run", tiny_artifact, cache_dir=str(cache))])
    assert failed.returncode != 0 and "subject_id 'sub-03'" in failed.stderr and "NaN or infinite" in failed.stderr
    assert (
        str(tmp_path / "bad" / "scans" / f"{SENTINEL}_03" / "t1.nii.gz") in failed.stderr
    )  # the console may show paths
    assert not (tmp_path / "failed_run").exists()
    # successful: the same cohort with the bad subject skipped, fitted, tested and predicted
    root = tmp_path / "run"
    args = _manifest_args(
        manifest,
        root,
        tiny_artifact,
        cache_dir=str(cache),
        on_bad_subject="skip",
        **{"split.val_fraction": "0.3", "split.test_fraction": "0.3"},
    )
    fit = rmr(["fit", *args, "--trainer.max_steps=3", "--trainer.val_check_interval=1"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    predict = rmr(["predict", *args, "--ckpt_path", "best"])
    assert predict.returncode == 0, predict.stderr[-3000:]
    written = [p for p in root.rglob("*") if p.is_file()]
    assert (
        (root / BAD_SUBJECTS_FILE).is_file()
        and list(root.glob("wandb/offline-run-*"))
        and list(root.glob("csv/**/metrics.csv"))
    )
    assert list(root.glob("predictions/*.csv")) and len(written) > 10
    assert _files_holding(root, "sub-03") == [str(root / BAD_SUBJECTS_FILE)]  # the pseudonym is found, so is a name
    assert "sub-00" in next(root.glob("predictions/*.csv")).read_text()  # the DICOM subject went through
    assert _files_holding(root, SENTINEL) == []
    assert _files_holding(root, "JANE") == []


def _checkpoint_naming(path: Path, class_path: str) -> Path:
    torch.save({"hyper_parameters": {"_class_path": class_path, "variant": "rmr"}, "state_dict": {}}, path)
    return path


def test_a_checkpoint_cannot_choose_the_model_class_to_import(tmp_path: Path, monkeypatch) -> None:
    """A class named in a checkpoint's hyperparameters is imported only if the config or rmr_lightning names it."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_model_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _checkpoint_naming(tmp_path / "foreign.ckpt", "evil_model_mod.Evil")
    with pytest.raises(
        CheckpointError, match=r"foreign.ckpt: its hyperparameters name the model class 'evil_model_mod.Evil'"
    ):
        cli_main(["test", *BRAIN, f"--ckpt_path={ckpt}", "--trainer.logger=false"])
    assert not marker.exists()


def test_a_checkpoint_of_the_retired_model_class_says_what_to_do(tmp_path: Path) -> None:
    ckpt = _checkpoint_naming(tmp_path / "old.ckpt", "rmr_lightning.finetuning.FrozenProcessorFinetuning")
    with pytest.raises(CheckpointError, match=r"old.ckpt was written by .*FrozenProcessorFinetuning.*fit again"):
        cli_main(["predict", *BRAIN, f"--ckpt_path={ckpt}", "--trainer.logger=false"])
