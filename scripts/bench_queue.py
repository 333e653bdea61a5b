"""Patch streaming of the lesion task: what the ``tio.Queue`` delivers against what training consumes.

One run, side by side: patches/s out of the training loader (queue with 0 and with ``--workers``
subject-loading processes) and patches/s of a fine-tuning step (forward and backward of ``rmr`` on
resident batches). A loader ratio above 1 means loading keeps up with training on this machine.
Usage: python scripts/bench_queue.py [--subjects 64] [--workers 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_write_json


def loader_rate(workers: int, subjects: int, epochs: int) -> float:
    cli = cli_main(
        [
            "--config",
            "configs/natural/lesion_ct.yaml",
            f"--data.init_args.split.train_size={subjects}",
            f"--data.init_args.loader.num_workers={workers}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    dm = cli.datamodule
    dm.setup("fit")
    loader = dm.train_dataloader()
    patches, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        patches += sum(b.batch_size for b in loader)
    return patches / (time.perf_counter() - start)


def train_rate(subjects: int, steps: int) -> float:
    cli = cli_main(
        [
            "--config",
            "configs/natural/lesion_ct.yaml",
            f"--data.init_args.split.train_size={subjects}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    dm, model = cli.datamodule, cli.model
    dm.setup("fit")
    batches = [b for b, _ in zip(dm.train_dataloader(), range(4), strict=False)]
    model.trainer = None
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    start = time.perf_counter()
    for k in range(steps):
        loss, _ = model.model_step(batches[k % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batches[0].batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    result = {
        "threads": torch.get_num_threads(),
        "queue_patches_per_s_0_workers": loader_rate(0, args.subjects, args.epochs),
        f"queue_patches_per_s_{args.workers}_workers": loader_rate(args.workers, args.subjects, args.epochs),
        "train_patches_per_s": train_rate(args.subjects, args.steps),
    }
    result["loader_over_train_0_workers"] = result["queue_patches_per_s_0_workers"] / result["train_patches_per_s"]
    print(json.dumps(result, indent=2))
    out = Path("results/bench")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "queue.json", result)


if __name__ == "__main__":
    main()
