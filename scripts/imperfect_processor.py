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
import math
from pathlib import Path

import pandas as pd
import torch

from rmr_lightning.artifact import load_processor_artifact, save_processor_artifact
from rmr_lightning.cli import cli_main
from rmr_lightning.files import atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text
from rmr_lightning.natural import reinitialise
from rmr_lightning.plotting import pyplot
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


def random_processor(source: Path, root: Path) -> dict:
    """``source``'s artifact with ``P`` replaced by a fresh random one of the same kind (seed 0), ``f`` and
    ``g`` kept: a frozen random ``P`` for ``rmr``. Its pretraining R^2 is unknown (NaN)."""
    if not (root / "metrics.json").is_file():
        artifact = load_processor_artifact(source / "processor.pt")
        torch.manual_seed(0)
        processor = reinitialise(artifact.processor)
        save_processor_artifact(
            root / "processor.pt", processor, artifact.encoder, artifact.decoder, artifact.abstract_spec
        )
        atomic_write_json(root / "metrics.json", {"r2_delta_in_distribution": math.nan, "r2_delta_dk84": math.nan})
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
    grouped = pd.concat(frames, ignore_index=True).groupby(["variant", "processor", "n_train"])
    by, check = grouped["test_mae"].mean(), grouped["p_check_r2"].mean()
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
                        f"p_check_r2_n{n}": check[(variant, label, n)],
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


def plot(table: pd.DataFrame, sizes: list[int], path: Path) -> None:
    """``rmr / baseline`` against the P check's R^2 of each processor, one panel per kind of phantoms."""
    plt = pyplot()
    rmr = table[table["variant"] == "rmr"]
    kinds = list(dict.fromkeys(rmr["phantoms"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        part = rmr[rmr["phantoms"] == kind]
        for k, n in enumerate(sizes):
            ax.scatter(part[f"p_check_r2_n{n}"], part[f"vs_baseline_n{n}"], color=f"C{k}", label=f"n={n}")
            for _, row in part.iterrows():
                ax.annotate(row["processor"], (row[f"p_check_r2_n{n}"], row[f"vs_baseline_n{n}"]), fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.05, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="P check R^2 on the training set", ylabel="rmr / baseline (test MAE of the change)")
        ax.set_title(f"{kind} phantoms")
        ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


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
        "--random", action=argparse.BooleanOptionalAction, default=True, help="also a frozen random P (default on)"
    )
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
    if args.random:
        artifacts["random P"] = args.out / "pretrain_random"
        quality["random P"] = random_processor(runs["diffusion, full"][0], artifacts["random P"])

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
    plot(table, args.sizes, args.out / "rmr_vs_p_check.png")
    print(text)


if __name__ == "__main__":
    main()
