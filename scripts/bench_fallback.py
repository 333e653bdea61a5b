"""Training-step time of ``rmr`` with and without the trust fallback, side by side in one process.

``python scripts/bench_fallback.py [--steps 10] [--threads 1]``: the 6 mm MRI demo config, one training
batch, the default artifact (``make pretrain``). Rows: ``trust: full`` (no fallback), ``checked`` at trust 1
(the fallback frozen and skipped), and the ``mlp`` and ``graph`` fallbacks at trust 0.5 (run and trained).
Prints the median step (forward, backward, AdamW) and its ratio to ``trust: full``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmr_lightning.cli import cli_main
from rmr_lightning.finetuning import NaturalFinetuning

SETTINGS = {
    "trust: full": ({"trust": "full"}, None),
    "checked, trust 1 (skipped)": ({"fallback": "graph"}, 1.0),
    "mlp fallback, trust 0.5": ({"fallback": "mlp"}, 0.5),
    "graph fallback, trust 0.5": ({"fallback": "graph"}, 0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--artifact", default="results/pretrain/processor.pt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cli = cli_main(["--config", "configs/natural/brain_mri.yaml", "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    targets, covariates = dm.train_table()
    runs = {}
    for name, (readout, trust) in SETTINGS.items():
        torch.manual_seed(0)
        model = NaturalFinetuning(args.artifact, "rmr", readout=readout)
        model.model.calibrate(targets, covariates)
        if trust is not None:
            model.model.set_trust(trust)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        runs[name] = (model, optimiser, [])
    for _ in range(args.steps + 2):  # interleaved, so machine load falls on every setting alike
        for model, optimiser, times in runs.values():
            start = time.perf_counter()
            loss, _ = model.model_step(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            times.append(time.perf_counter() - start)
    reference = statistics.median(runs["trust: full"][2][2:])
    print(f"batch of {batch.batch_size} scans, {args.threads} thread(s), median of {args.steps} steps")
    for name, (_, _, times) in runs.items():
        median = statistics.median(times[2:])
        print(f"  {name:28s} {1000 * median:7.1f} ms  ({median / reference:.2f}x trust: full)")


if __name__ == "__main__":
    main()
