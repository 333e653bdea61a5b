"""Logging overhead: the same pretraining epoch with no logger and with W&B offline, side by side.

Runs are interleaved (none, wandb, wandb, none, ...) so drift in machine speed cancels; each timing
covers the whole ``fit`` of one epoch including the logger's start. Prints the ratio of the means.
Usage: python scripts/bench_logging.py [--num-train 100000] [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_write_json


def one_epoch(logger: str, num_train: int, root: Path) -> float:
    args = [
        "--config",
        "configs/pretrain/ndm.yaml",
        f"--data.init_args.num_train={num_train}",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={root}",
    ]
    if logger == "none":
        args.append("--trainer.logger=false")
    else:
        args.append(f"--trainer.logger.init_args.save_dir={root}")
    cli = cli_main(args, run=False)
    cli.datamodule.setup("fit")  # data generation is not logging: keep it out of the timing
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if logger == "wandb":
        cli.trainer.logger.experiment.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=2)
    opts = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    times: dict[str, list[float]] = {"none": [], "wandb": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(opts.pairs):
            order = ("none", "wandb") if k % 2 == 0 else ("wandb", "none")
            for logger in order:
                times[logger].append(one_epoch(logger, opts.num_train, Path(tmp) / f"{logger}{k}"))
                print(f"{logger:6s} epoch: {times[logger][-1]:.1f} s", flush=True)
    ratio = statistics.mean(times["wandb"]) / statistics.mean(times["none"])
    pair_ratios = [w / n for w, n in zip(times["wandb"], times["none"], strict=True)]
    report = {
        "seconds": times,
        "num_train": opts.num_train,
        "ratio_wandb_offline_over_none": round(ratio, 4),
        "pair_ratios": [round(r, 4) for r in pair_ratios],
        "median_pair_ratio": round(statistics.median(pair_ratios), 4),
    }
    Path("results/bench").mkdir(parents=True, exist_ok=True)
    atomic_write_json("results/bench/logging.json", report)
    print(f"per pair: {', '.join(f'{r:.3f}' for r in pair_ratios)} (machine noise shows in their spread)")
    print(f"W&B offline / no logger = {ratio:.3f} (mean of {opts.pairs} epochs each)")


if __name__ == "__main__":
    main()
