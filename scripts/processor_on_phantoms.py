"""Is a processor artifact accurate on the states a phantom cohort presents? A check before fine-tuning.

A pretraining R^2 is measured on the abstract input mix; a natural task asks ``P`` about other states
(here: the regional pathology of simulated subjects, mostly small and sparse). This draws a cohort's
hidden baseline states and horizons as ``BrainPhantomDataModule`` does, runs ``g(P(f(x, params)))`` with
the cohort's true parameters, and prints the R^2 and MAE of the predicted change against ``A``.
Usage: python scripts/processor_on_phantoms.py [--artifact results/pretrain/processor.pt] [--algorithm diffusion|fkpp]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from datamodules.brain_phantom import BrainPhantomDataModule, simulate_disease
from rmr_lightning.algorithms import FisherKPP, NetworkDiffusion
from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.natural import NaturalModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=None, help="default: results/pretrain(_fkpp)/processor.pt")
    parser.add_argument("--algorithm", choices=["diffusion", "fkpp"], default="diffusion")
    parser.add_argument("--gamma", type=float, default=0.15)
    parser.add_argument("--alpha", type=float, default=0.6, help="Fisher-KPP only")
    parser.add_argument("--subjects", type=int, default=256)
    args = parser.parse_args()
    if args.algorithm == "fkpp":
        algorithm, cohort = FisherKPP(growth_rate=0.5), {"gamma": args.gamma, "alpha": args.alpha}
    else:
        algorithm, cohort = NetworkDiffusion(), {"gamma": args.gamma}
    path = args.artifact or f"results/pretrain{'_fkpp' if args.algorithm == 'fkpp' else ''}/processor.pt"
    model = NaturalModel(load_processor_artifact(path), variant="rmr").eval()  # f, P, g as fine-tuning uses them
    if model.param_names != list(algorithm.param_names):
        raise SystemExit(
            f"{path} was pretrained with parameters {model.param_names}, not {list(algorithm.param_names)}"
        )

    every_region = torch.ones(model.num_regions, dtype=torch.bool)
    ranges = BrainPhantomDataModule(
        algorithm=algorithm, disease={"cohort_params": cohort}
    ).disease  # the datamodule's stage, horizon, age
    cohort_draw = simulate_disease(
        args.subjects,
        np.random.default_rng(1),
        algorithm,
        cohort,
        every_region,
        ranges.stage,
        ranges.horizon,
        ranges.age,
    )
    x, y, horizon = cohort_draw["x_baseline"], cohort_draw["x_followup"], cohort_draw["horizon"]  # (B, R), (B, R), (B,)
    true_params = {**cohort, algorithm.time_param: horizon}
    params = torch.stack([torch.as_tensor(true_params[n]).float().expand_as(horizon) for n in model.param_names], 1)
    with torch.no_grad():
        z = model.embed(x, params / model.param_scale)  # (B*R, H)
        change = (model.decoder(model.process(z, len(x))) - model.decoder(z)).reshape(x.shape)  # g(P(z)) - g(z)
    true = y - x
    r2 = 1 - ((change - true) ** 2).sum() / ((true - true.mean()) ** 2).sum()
    print(
        f"{path} on {args.subjects} {args.algorithm} phantom subjects ({cohort}): R^2 of the change {r2:.4f}, "
        f"MAE {(change - true).abs().mean():.5f} (mean |change| {true.abs().mean():.5f}); "
        f"states: mean {x.mean():.3f}, {(x < 0.01).float().mean():.0%} of regions below 0.01"
    )


if __name__ == "__main__":
    main()
