"""Does RMR stay ahead when P is imperfect? Frozen processors of decreasing quality on the CPU demo task.

The RMR paper's claim (Veličković et al. 2022, sec. 5) that users test: a frozen P still helps when it
is under-trained or emulates a mismatched algorithm. For each kind of phantom cohort (pathology spread by
network diffusion, or by Fisher-KPP), this runs ``baseline`` and ``scratch`` once and ``rmr`` with every
processor artifact, at the same training sizes and seeds, and prints one table: each P's R^2 on its own
pretraining test sets beside the test MAE of ``rmr`` with it and its ratio to ``baseline`` and ``scratch``.

Processors: the default artifact (``make pretrain``), short pretraining runs of the same config
(``--steps``, cosine schedules over those steps), and the Fisher-KPP artifact (``make pretrain-fkpp``;
each full one is trained here when missing),
which is the matched P on Fisher-KPP phantoms and the mismatched one on diffusion phantoms (and vice
versa). Every study resumes from its summary.csv. Usage:
    python scripts/imperfect_processor.py [--steps 100 400] [--sizes 8 16] [--seeds 0 1 2] [--variants rmr unfrozen]
        [--readouts calibrated residual] [--phantoms diffusion fkpp] [--out results/imperfect]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_write_csv, atomic_write_text
from rmr_lightning.study import Study, run_study

PRETRAIN = {
    "diffusion": ["configs/pretrain/ndm.yaml"],
    "fkpp": ["configs/pretrain/ndm.yaml", "configs/pretrain/fkpp.yaml"],
}
PHANTOMS = {"diffusion": [], "fkpp": ["--config=configs/natural/fkpp.yaml"]}


def pretrain(configs: list[str], root: Path, steps: int | None) -> dict:
    """``rmr fit`` + ``rmr test`` into ``root`` unless its metrics exist; returns metrics.json."""
    if not (root / "metrics.json").is_file():
        args = [a for c in configs for a in ("--config", c)] + [
            f"--trainer.default_root_dir={root}"
        ]  # artifact and logs follow it
        if steps is not None:
            args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
        cli = cli_main(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return json.loads((root / "metrics.json").read_text())


def compare(args: argparse.Namespace, phantoms: str, readout: str, artifacts: dict, quality: dict) -> list[dict]:
    """baseline, scratch and rmr with every artifact on one cohort and readout; rows of the table."""
    common = dict(
        base_config="configs/natural/brain_mri.yaml",
        train_sizes=args.sizes,
        seeds=args.seeds,
        logger="csv",
        workers=args.workers,
    )
    overrides = [
        *PHANTOMS[phantoms],
        "--data.init_args.split.train_pool=64",
        f"--model.init_args.readout.kind={readout}",
        *args.overrides,
    ]
    folder = args.out / phantoms / ("" if readout == "calibrated" else readout)

    def study(name: str, variants: list[str], artifact: Path) -> pd.DataFrame:
        return run_study(
            Study(
                output_dir=str(folder / name),
                task=f"brain_mri_6mm_{phantoms}",
                variants=variants,
                overrides=[*overrides, f"--model.init_args.processor_artifact={artifact / 'processor.pt'}"],
                **common,
            )
        )

    frames = [study("reference", ["baseline", "scratch"], artifacts[f"{phantoms}, full"]).assign(processor="")]
    for label, root in artifacts.items():
        frames.append(study(label.replace(", ", "_").replace(" ", ""), args.variants, root).assign(processor=label))
    by = pd.concat(frames, ignore_index=True).groupby(["variant", "processor", "n_train"])["test_mae"].mean()
    rows = []
    for label in artifacts:
        for variant in args.variants:
            row = {
                "phantoms": phantoms,
                "readout": readout,
                "variant": variant,
                "processor": label,
                "matched": label.startswith(phantoms),
            }
            row.update({f"p_r2_{s}": quality[label][f"r2_delta_{s}"] for s in ("in_distribution", "dk84")})
            for n in args.sizes:
                mae = by[(variant, label, n)]
                row.update(
                    {
                        f"mae_n{n}": mae,
                        f"vs_baseline_n{n}": mae / by[("baseline", "", n)],
                        f"vs_scratch_n{n}": mae / by[("scratch", "", n)],
                    }
                )
            rows.append(row)
    for v in ("baseline", "scratch"):
        rows.append(
            {
                "phantoms": phantoms,
                "readout": readout,
                "variant": v,
                **{f"mae_n{n}": by[(v, "", n)] for n in args.sizes},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, nargs="*", default=[100, 400], help="short pretraining runs of the default P"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--phantoms", nargs="+", default=list(PHANTOMS), choices=list(PHANTOMS))
    parser.add_argument(
        "--readouts",
        nargs="+",
        default=["calibrated"],
        choices=["calibrated", "linear", "residual"],
        help="g' of every variant (NaturalFinetuning's readout): calibrated (default), linear, residual",
    )
    parser.add_argument(
        "--variants", nargs="+", default=["rmr"], help="variants run with every processor artifact (rmr, unfrozen)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--overrides",
        nargs="*",
        action="extend",
        default=[],
        help="extra rmr arguments for every fine-tuning run; repeat it for several, e.g. "
        "--overrides=--model.init_args.head.region_centring=false --overrides=--model.init_args.lr_factors.gain=1",
    )
    parser.add_argument("--out", type=Path, default=Path("results/imperfect"))
    args = parser.parse_args()

    runs = {  # label -> (folder with processor.pt and metrics.json, algorithm it emulates, steps; None: the config's)
        "diffusion, full": (Path("results/pretrain"), "diffusion", None),
        "fkpp, full": (Path("results/pretrain_fkpp"), "fkpp", None),
        **{f"diffusion, {n} steps": (args.out / f"pretrain_{n}", "diffusion", n) for n in args.steps},
    }
    quality = {label: pretrain(PRETRAIN[algorithm], root, steps) for label, (root, algorithm, steps) in runs.items()}
    artifacts = {label: root for label, (root, _, _) in runs.items()}

    rows = []
    for phantoms in args.phantoms:
        for readout in args.readouts:
            rows += compare(args, phantoms, readout, artifacts, quality)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.out / "summary.csv", table)
    text = (
        f"Test MAE of the change, mean over seeds {args.seeds}; "
        "ratios to baseline / scratch on the same cohort and seeds.\n\n"
    )
    cells = table.astype(object).where(table.notna(), "")
    text += "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    text += "\n".join(
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in cells.itertuples(index=False)
    )
    atomic_write_text(args.out / "summary.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
