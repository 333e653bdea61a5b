"""What a run records: the whole resolved config (logger and beside the checkpoints), the processor
artifact's hash and the variant; W&B offline without a login; no subject identifiers in logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from rmr_lightning.cli import cli_main, default_wandb_mode
from tests.helpers import REPO, tiny_natural


def test_wandb_defaults_to_offline_without_a_login(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")  # an explicit choice is kept
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "online"


def test_natural_run_logs_config_hash_and_variant_to_wandb(
    tiny_artifact: Path, tmp_path: Path, monkeypatch, recwarn
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt")},
    }
    scans = {"class_path": "rmr_lightning.callbacks.LogScanSlices", "init_args": {"max_scans": 2}}  # opt-in images
    cli = cli_main(
        [
            "--config",
            "configs/natural/brain_mri.yaml",
            *tiny_natural(tiny_artifact),
            "--model.init_args.variant=scratch",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.callbacks=[{json.dumps(checkpoint)}, {json.dumps(scans)}]",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    config = cli.trainer.logger.experiment.config
    assert config["cli"]["model"]["init_args"]["variant"] == "scratch"  # the nested config, not flattened
    assert config["cli"]["seed_everything"] == 0
    assert config["processor_sha256"] == cli.model.artifact_sha256 and config["variant"] == "scratch"
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["processor_artifact"] == str(tiny_artifact)
    # the machine and package versions beside the config and in the W&B run: which runs should agree bit for bit
    environment = json.loads((tmp_path / "ckpt" / "environment.json").read_text())
    assert environment["packages"]["torch"] == torch.__version__ == config["environment"]["packages"]["torch"]
    assert config["environment"]["torch_threads"] == torch.get_num_threads()
    # our own config.yaml must not set off Lightning's warning about reusing a checkpoint folder
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    cli.trainer.logger.experiment.finish()
    logged = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.log"))
    assert "phantom-mri-0000" not in logged  # subject ids never reach the logger
    assert len(list(tmp_path.rglob("media/images/**/*.png"))) == 2  # the two scans, as W&B images
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".pt")
    assert b"val scan 0" in written and b"phantom-mri-" not in written  # captions by position, never the subject


def test_scan_slices_without_wandb_are_pngs_of_the_preprocessed_scans(tiny_artifact: Path, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    scans = {"class_path": "rmr_lightning.callbacks.LogScanSlices", "init_args": {"max_scans": 3}}
    cli = cli_main(
        [
            "--config",
            "configs/natural/brain_mri.yaml",
            *tiny_natural(tiny_artifact),
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.callbacks=[{json.dumps(scans)}]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    files = sorted((Path(cli.trainer.logger.log_dir) / "scans").glob("*.png"))
    assert [f.name for f in files] == [
        "val_scan_0.png",
        "val_scan_1.png",
    ]  # the validation batch holds 2 of the 3 asked for
    panel = plt.imread(files[0])
    assert panel.ndim == 3 and panel[..., :3].std() > 0.05  # slices, not a blank image
    assert all(b"phantom-" not in f.read_bytes() for f in files)
    shipped = [p.read_text() for p in (REPO / "configs").rglob("*.yaml")]
    assert not any("LogScanSlices" in text for text in shipped)  # images are opt-in
