"""The manifest data path at cohort scale: validation, the preprocessing cache, memory and throughput.

Writes synthetic T1-like brains rendered from the shipped DK84 anatomy (a few distinct scans, hard-linked
under one path per subject, so every subject is its own file to validate, preprocess and cache), then,
per cohort size and each in a fresh process: a cold run (header validation, preprocessing every scan into
an empty cache, a short fit) and a warm rerun with the same settings (a short fit with 2 loader workers,
whose peak memory over the process tree is ``peak_rss_mb``). Side by side in one process: train steps
reading the cache against the same batches already in memory (``cached_over_resident``, with the
datamodule's default loader in the main process; ``cached_over_resident_by_workers`` adds 2 workers).

    python scripts/bench_data.py --subjects 200,2000 --spacing 2 --out results/bench/data_path.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
DISTINCT = 8  # distinct rendered scans; subjects beyond them are hard links (separate files to the cache)


def save_nifti(image, path: Path) -> None:
    """``image`` as ``.nii.gz``, written whole or not at all (a killed run leaves no half scan for a rerun)."""
    from rmr_lightning.files import atomic_write

    atomic_write(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)), binary=True)


def write_cohort(folder: Path, subjects: int, spacing: int) -> Path:
    """A manifest of ``subjects`` rows over hard links to ``DISTINCT`` rendered scans (image + DK84 labels)."""
    import nibabel as nib

    from datamodules.manifest import dk84_region_names
    from rmr_lightning.data.anatomy import load_anatomy
    from rmr_lightning.files import atomic_write_text

    anatomy = load_anatomy(spacing=spacing)
    scans = folder / "distinct"
    scans.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(DISTINCT):
        if not (scans / f"t1_{k}.nii.gz").is_file():
            t1 = 0.35 * anatomy.csf + 0.6 * anatomy.gm + 0.95 * anatomy.wm
            t1 = (t1 * (1 + 0.1 * rng.standard_normal()) + 0.03 * torch.randn(t1.shape)).numpy().astype(np.float32)
            # labels first: the image's presence is what says the pair is complete (a rerun skips it)
            save_nifti(
                nib.Nifti1Image(anatomy.labels.numpy().astype(np.int16), anatomy.affine), scans / f"dk84_{k}.nii.gz"
            )
            save_nifti(nib.Nifti1Image(t1, anatomy.affine), scans / f"t1_{k}.nii.gz")
    names = dk84_region_names()
    subjects_dir = folder / f"n{subjects}"
    subjects_dir.mkdir(exist_ok=True)
    lines = ["subject_id,image,label_map,age,horizon," + ",".join(f"base_{n}" for n in names) + "," + ",".join(names)]
    for i in range(subjects):
        k = i % DISTINCT
        for kind in ("t1", "dk84"):
            link = subjects_dir / f"sub-{i:05d}_{kind}.nii.gz"
            if not link.exists():
                os.link(scans / f"{kind}_{k}.nii.gz", link)
        values = rng.uniform(0.0, 0.1, size=2 * len(names)).round(4)
        values[len(names) :] += 0.02
        cells = ",".join(str(v) for v in values)
        lines.append(
            f"sub-{i:05d},n{subjects}/sub-{i:05d}_t1.nii.gz,"
            f"n{subjects}/sub-{i:05d}_dk84.nii.gz,{70 + i % 10},1.5,{cells}"
        )
    manifest = folder / f"manifest_{subjects}.csv"
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def _cli(manifest: Path, artifact: Path, root: Path, shape: list[int], spacing: int, steps: int, workers: int):
    from rmr_lightning.cli import cli_main

    return cli_main(
        [
            "--config",
            str(REPO / "configs/natural/manifest.yaml"),
            f"--data.init_args.manifest={manifest}",
            f"--data.init_args.spacing={spacing}",
            f"--data.init_args.shape={shape}",
            f"--data.init_args.loader.num_workers={workers}",
            "--data.init_args.loader.batch_size=4",
            f"--model.init_args.processor_artifact={artifact}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ],
        run=False,
    )


def _cache_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.pt")) + sum(1 for _ in folder.rglob("*.bad.json"))


def child_run(args: argparse.Namespace) -> dict:
    """One run in this process: validate headers, fill the cache, fit a few steps; timings and counts."""
    from datamodules.manifest import read_manifest

    cache = Path(os.environ["RMR_CACHE"]) / "scans"
    before = _cache_files(cache) if cache.is_dir() else 0
    cli = _cli(Path(args.manifest), Path(args.artifact), Path(args.root), args.shape, args.spacing, args.steps, 2)
    dm = cli.datamodule
    start = time.perf_counter()
    read_manifest(args.manifest, dm.region_names, None, dm.covariate_names)
    validate = time.perf_counter() - start
    start = time.perf_counter()
    dm.setup("fit")  # validation again (from headers) and the cache
    setup = time.perf_counter() - start
    preprocessed = _cache_files(cache) - before
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=dm)
    return {
        "validate_s": validate,
        "setup_s": setup,
        "preprocessed": preprocessed,
        "fit_s": time.perf_counter() - start,
    }


def run_child(args: argparse.Namespace, manifest: Path, root: Path, env: dict) -> tuple[dict, float]:
    """A child run and the peak resident memory (MB) of its process tree, polled every 50 ms."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--manifest",
        str(manifest),
        "--artifact",
        str(args.artifact),
        "--root",
        str(root),
        "--spacing",
        str(args.spacing),
        "--shape",
        json.dumps(args.shape),
        "--steps",
        str(args.steps),
    ]
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"child run failed ({proc.returncode}):\n{out[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak / 2**20


def cached_over_resident(args: argparse.Namespace, manifest: Path, root: Path, workers: int = 2) -> dict:
    """Train-step throughput reading the cache (``workers`` loader processes) against the same batches
    held in memory, in one process, cached before and after resident so drift of the machine cancels."""
    rates = {}
    for mode in ("cached", "resident", "cached_again"):
        cli = _cli(manifest, args.artifact, root / mode, args.shape, args.spacing, args.steps, workers)
        dm = cli.datamodule
        dm.setup("fit")
        clock = _Clock(warmup=3)
        cli.trainer.callbacks.append(clock)
        if mode == "resident":
            resident = _Repeat(list(dm.train_dataloader())[: args.steps])
            dm.train_dataloader = lambda resident=resident: (
                resident
            )  # the same datamodule (its training table sets the scales)
        cli.trainer.fit(cli.model, datamodule=dm)
        rates[mode] = clock.rate
    cached = (rates["cached"] + rates["cached_again"]) / 2  # before and after: drift of the machine cancels
    return {
        "cached_steps_per_s": cached,
        "resident_steps_per_s": rates["resident"],
        "ratio": cached / rates["resident"],
    }


class _Repeat:
    """Batches held in memory, served in order for as many epochs as asked."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Clock(L.Callback):
    """Train steps per second after ``warmup`` steps, loading included (batch start to batch start)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())

    @property
    def rate(self) -> float:
        t = self.times[self.warmup :]
        return (len(t) - 1) / (t[-1] - t[0])


def validate_rows(folder: Path, rows: int, spacing: int) -> float:
    """Seconds to check ``rows`` manifest rows from cells and headers (hard links to the same scans)."""
    from datamodules.manifest import dk84_region_names, read_manifest

    manifest = write_cohort(folder, rows, spacing)
    start = time.perf_counter()
    checks, problems = read_manifest(manifest, dk84_region_names(), None, ["age", "horizon"])
    seconds = time.perf_counter() - start
    assert not problems and all(c.row is not None for c in checks), "the synthetic manifest should be valid"
    return seconds


def tiny_artifact(path: Path) -> Path:
    """A width-32 MPNN pretrained for one short epoch (the data path is measured, not the model's accuracy)."""
    from datamodules.abstract import AbstractGraphDataModule
    from rmr_lightning.pretraining import quick_artifact

    dm = AbstractGraphDataModule(num_train=256, num_val=32, num_test=32, num_graphs=16, loader={"batch_size": 32})
    return quick_artifact(dm, "mpnn", 32, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default="200,2000", help="cohort sizes, comma-separated")
    parser.add_argument("--spacing", type=int, default=2)
    parser.add_argument(
        "--shape", type=json.loads, default=None, help="voxels after crop/pad (default: the brain at --spacing)"
    )
    parser.add_argument("--steps", type=int, default=20, help="train steps per fit")
    parser.add_argument(
        "--validate-rows", type=int, default=10000, help="manifest rows for the header-validation timing"
    )
    parser.add_argument("--out", default="results/bench/data_path.json")
    parser.add_argument("--work", default=None, help="folder for scans and cache (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run, in a fresh process
    for name in ("--manifest", "--artifact", "--root"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_run(args)))
        return
    bench(args)


def bench(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    args.shape = args.shape or {2: [80, 96, 80], 4: [40, 48, 40]}.get(
        args.spacing, [160 // args.spacing, 192 // args.spacing, 160 // args.spacing]
    )
    args.artifact = tiny_artifact(work / "processor.pt")
    env = {**os.environ, "RMR_CACHE": str(work / "cache"), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    sizes = [int(s) for s in args.subjects.split(",")]
    report: dict = {
        "subjects": sizes,
        "spacing_mm": args.spacing,
        "shape": args.shape,
        "peak_rss_mb": {},
        "cold": {},
        "warm": {},
    }
    for n in sizes:
        manifest = write_cohort(work, n, args.spacing)
        report["cold"][n], _ = run_child(args, manifest, work / f"run_cold_{n}", env)
        report["warm"][n], peak = run_child(args, manifest, work / f"run_warm_{n}", env)
        report["peak_rss_mb"][n] = round(peak, 1)
        print(f"n={n}: cold {report['cold'][n]}, warm {report['warm'][n]}, peak RSS {peak:.0f} MB", flush=True)
    largest = max(sizes)
    report["preprocessed_on_rerun"] = report["warm"][largest]["preprocessed"]
    report["validate_s_per_subject"] = report["warm"][largest]["validate_s"] / largest
    cold = report["cold"][largest]  # setup = header validation + preprocessing into the empty cache
    report["preprocess_s_per_subject"] = (cold["setup_s"] - cold["validate_s"]) / max(cold["preprocessed"], 1)
    os.environ["RMR_CACHE"] = env["RMR_CACHE"]
    small = write_cohort(work, sizes[0], args.spacing)
    # the datamodule's default loader (0 workers: on 2 cores, workers take CPU from the step), and 2 workers
    detail = {w: cached_over_resident(args, small, work / f"throughput_{w}", w) for w in (0, 2)}
    report["cached_over_resident"] = detail[0]["ratio"]
    report["cached_over_resident_by_workers"] = detail
    report["validate_rows"] = {
        "rows": args.validate_rows,
        "seconds": validate_rows(work, args.validate_rows, args.spacing),
    }
    report["rss_ratio_largest_over_smallest"] = report["peak_rss_mb"][largest] / report["peak_rss_mb"][min(sizes)]
    from rmr_lightning.environment import run_environment
    from rmr_lightning.files import atomic_write_json

    report["environment"] = run_environment()
    atomic_write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("cold", "warm", "environment")}, indent=2))


if __name__ == "__main__":
    main()
