"""Reproducibility and exact resume: same seed, same metrics; a SIGKILLed fit resumed with
``--ckpt_path last`` ends where an uninterrupted one does, and continues the same W&B run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_PRETRAIN, rmr, subprocess_env


def _args(root: Path, epochs: int) -> list[str]:
    callbacks = [
        {"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": str(root)}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": -1, "every_n_epochs": 1},
        },
    ]
    return [
        "fit",
        "--config",
        "configs/pretrain/ndm.yaml",
        *TINY_PRETRAIN,
        "--data.init_args.num_train=2048",
        "--trainer.max_steps=-1",
        f"--trainer.max_epochs={epochs}",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]


def _final(root: Path) -> dict[str, float]:
    stats = json.loads((root / "fit_stats.json").read_text())
    return {k: v for k, v in stats.items() if k.startswith("val_")} | {"global_step": stats["global_step"]}


def _run_ids(root: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (root / "wandb").glob("offline-run-*")}


def _wait_for_orphaned_wandb_service(pid: int, timeout: float = 60.0) -> None:
    """W&B's service runs in its own session and exits once it sees its parent ``pid`` gone; wait for it,
    so that it is no longer writing the run's offline files when the resumed fit opens them."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orphans = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "--pid" in cmd and cmd[cmd.index("--pid") + 1 : cmd.index("--pid") + 2] == [str(pid)]:
                orphans.append(p)
        if not orphans:
            return
        time.sleep(0.2)
    raise AssertionError(f"W&B service of killed process {pid} still running after {timeout} s")


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_same_seed_same_metrics(tmp_path: Path) -> None:
    finals = []
    for name in ("a", "b"):
        result = rmr(_args(tmp_path / name, epochs=2))
        assert result.returncode == 0, result.stderr[-3000:]
        finals.append(_final(tmp_path / name))
    assert finals[0] == finals[1]


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_killed_fit_resumes_to_the_same_result_and_wandb_run(tmp_path: Path) -> None:
    epochs = 12
    reference = rmr(_args(tmp_path / "ref", epochs))
    assert reference.returncode == 0, reference.stderr[-3000:]

    root = tmp_path / "killed"
    env = subprocess_env()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "rmr"), *_args(root, epochs)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list((root / "ckpt").glob("epoch=2*.ckpt")):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_for_orphaned_wandb_service(proc.pid)
    assert not (root / "fit_stats.json").exists()  # it really died mid-run
    first_ids = _run_ids(root)

    resumed = rmr([*_args(root, epochs), "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, expected = _final(root), _final(tmp_path / "ref")
    assert final["global_step"] == expected["global_step"]
    for key, value in expected.items():
        assert abs(final[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, final[key], value)
    assert len(first_ids) == 1 and _run_ids(root) == first_ids  # the resumed fit continued the same W&B run
