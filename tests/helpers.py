"""Small helpers shared by the tests (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rmr_lightning.algorithms import NetworkDiffusion

REPO = Path(__file__).resolve().parents[1]

# Tiny sizes that keep a pretraining run to seconds.
TINY_PRETRAIN = [
    "--data.init_args.num_train=128",
    "--data.init_args.num_val=32",
    "--data.init_args.num_test=32",
    "--data.init_args.num_graphs=8",
    "--data.init_args.loader.batch_size=32",
    "--model.init_args.hidden_dim=16",
]


def tiny_model(artifact: Path) -> list[str]:
    """Overrides of a natural config's model: the given artifact and a tiny encoder."""
    return [
        f"--model.init_args.processor_artifact={artifact}",
        "--model.init_args.encoder.init_args.widths=[2,4,4]",
        "--model.init_args.encoder.init_args.out_channels=4",
    ]


def tiny_natural(artifact: Path) -> list[str]:
    """Overrides that make a natural config run on an 8 mm cohort of a few subjects."""
    return [
        *tiny_model(artifact),
        "--data.init_args.spacing=8",
        "--data.init_args.split.train_pool=4",
        "--data.init_args.split.train_size=4",
        "--data.init_args.split.num_val=2",
        "--data.init_args.split.num_test=2",
        "--data.init_args.loader.batch_size=2",
    ]


def tiny_manifest(manifest: Path, artifact: Path) -> list[str]:
    """Overrides that make ``configs/natural/manifest.yaml`` run on the tests' 8 mm phantom manifest."""
    return [
        f"--data.init_args.manifest={manifest}",
        *tiny_model(artifact),
        "--data.init_args.spacing=8",
        "--data.init_args.shape=[24,28,24]",
        "--data.init_args.loader.batch_size=2",
    ]


def ddp_fit_with_probe(config: list[str], tmp_path: Path, probe: str = "RecordSubjects") -> Path:
    """``rmr fit`` of ``config`` (a config and its overrides) for two epochs on two CPU processes (gloo), with
    ``tests/ddp_probe.py``'s ``probe`` callback recording each rank's view; returns the probe's folder."""
    import json

    seen = tmp_path / "seen"
    callback = {"class_path": f"ddp_probe.{probe}", "init_args": {"dirpath": str(seen)}}
    args = [
        "fit",
        *config,
        "--trainer.max_epochs=2",
        "--trainer.max_steps=-1",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks=[{json.dumps(callback)}]",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false",
    ]
    result = rmr(args, env={"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    return seen


def tiny_lesion(artifact: Path) -> list[str]:
    """Overrides that make the lesion config run on a few small subjects."""
    return [
        *tiny_model(artifact),
        "--data.init_args.split.train_pool=6",
        "--data.init_args.split.train_size=6",
        "--data.init_args.split.num_val=2",
        "--data.init_args.split.num_test=2",
        "--data.init_args.loader.batch_size=2",
        "--data.init_args.size=24",
        "--data.init_args.patch_size=16",
        "--data.init_args.roi_mm=5",
        "--data.init_args.nodules.diameter_mm=[4,8]",
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for an ``rmr`` child: offline W&B with its own service. ``WANDB_SERVICE`` is dropped
    because a W&B run started earlier in this pytest process exports it, and a child that inherits it
    registers its run in pytest's service, which keeps a SIGKILLed child's run ID "in use" for good."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **extra}


def rmr(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the ``rmr`` console script in a subprocess (DDP re-launches it, so it cannot run in pytest)."""
    full_env = subprocess_env(**(env or {}))
    cmd = [str(Path(sys.executable).parent / "rmr"), *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


class FasterDiffusion(NetworkDiffusion):
    """Another algorithm with network diffusion's parameter names (diffusion at twice the rate)."""

    def run(self, prepared, x0, params):
        return prepared.solve(x0, 2.0 * params[:, 0] * params[:, 1])


def tiny_study(artifact: Path, output_dir: Path, task: str, seeds: list[int]):
    """A study of rmr and baseline at 2 and 4 subjects on a tiny 8 mm cohort, two steps per run."""
    from rmr_lightning.study import Study

    return Study(
        base_config="configs/natural/brain_mri.yaml",
        output_dir=str(output_dir),
        task=task,
        variants=["rmr", "baseline"],
        train_sizes=[2, 4],
        seeds=seeds,
        logger="csv",
        overrides=[*tiny_natural(artifact), "--trainer.max_steps=2", "--trainer.val_check_interval=2"],
    )
