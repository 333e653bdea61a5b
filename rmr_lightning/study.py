"""``rmr-study``: the sample-efficiency study, every variant at several training-set sizes and seeds.

Each run is an ordinary ``rmr fit`` + ``rmr test`` of a natural config (built in-process through the
same LightningCLI, so configs, links and saved ``config.yaml`` are those of a single run), with the
variant, training size and seed overridden. Results are appended to ``summary.csv`` after every run,
so an interrupted study resumes where it stopped. At the end: ``summary.md`` (mean +- std per
variant and size, and the ratios the RMR claims rest on) and ``sample_efficiency.png``.

Every file is written whole or not at all (``rmr_lightning.files``), so a study killed at any moment
(a time limit, an out-of-memory kill, Ctrl-C) resumes from a readable ``summary.csv``: a run with a row
there is done and never redone; a run without one, whose folder a killed attempt may have left half
written, starts again from an empty folder.
"""

from __future__ import annotations

import gc
import html
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jsonargparse import ActionConfigFile, ArgumentParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rmr_lightning.cli import cli_main, setup_data
from rmr_lightning.environment import ENVIRONMENT_FILE, run_environment
from rmr_lightning.files import atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text, spreadsheet_safe
from rmr_lightning.plotting import pyplot

COLUMNS = [
    "task",
    "variant",
    "n_train",
    "seed",
    "test_mae",
    "test_r2",
    "test_mae_followup",
    "test_state_corr",
    "val_mae",
    "seconds",
    "checkpoint",
    "processor_artifact",
    "processor_sha256",
    "p_check_r2",
    "test_flag_auroc",
    "test_flag_sensitivity",
    "val_flag_auroc",
    "val_flag_sensitivity",
    "test_flag_sensitivity_at_threshold",
    "test_flag_specificity_at_threshold",
]
VARIANT_ORDER = ["rmr", "unfrozen", "scratch", "random_p", "baseline"]
SUMMARY_FILES = (
    "summary.csv",
    "summary.md",
    "sample_efficiency.png",
    ENVIRONMENT_FILE,
)  # what run_study writes in output_dir


@dataclass
class Study:
    """What to run.

    Args:
        base_config: the natural config every run starts from (e.g. ``configs/natural/brain_mri.yaml``).
        output_dir: where runs, ``summary.csv``, ``summary.md`` and ``sample_efficiency.png`` go.
        task: name written in the ``task`` column.
        measure: what ``test_mae`` measures, for the table and the plot.
        variants: variants of ``NaturalFinetuning`` to compare.
        train_sizes: training-set sizes (subjects).
        seeds: seeds; each picks the training subset, the initialisation and the data order.
        overrides: extra ``rmr`` arguments applied to every run (e.g. ``--trainer.max_steps=300``).
        logger: ``csv``, ``tensorboard``, ``wandb`` (runs grouped per study) or ``none``.
        workers: runs at a time, each in its own process with ``cpus / workers`` threads. Small 3D CNNs
            use two CPU cores poorly inside one run, so two one-thread runs finish ~1.4x sooner on two
            cores; on one GPU, a few runs at a time fill it better than one.
    """

    base_config: str
    output_dir: str = "results/study"
    task: str = "brain_mri"
    measure: str = "regional atrophy change (follow-up minus baseline)"
    variants: list[str] = field(default_factory=lambda: ["rmr", "baseline", "scratch", "unfrozen", "random_p"])
    train_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    logger: str = "csv"
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    def runs(self) -> list[tuple[str, int, int]]:
        return [(v, n, s) for n in self.train_sizes for s in self.seeds for v in self.variants]


def _logger_arg(kind: str, folder: Path, study: Study, name: str) -> list[str]:
    if kind == "none":
        return ["--trainer.logger=false"]
    classes = {
        "csv": ("lightning.pytorch.loggers.CSVLogger", {"save_dir": str(folder), "name": "logs"}),
        "tensorboard": ("lightning.pytorch.loggers.TensorBoardLogger", {"save_dir": str(folder), "name": "logs"}),
        "wandb": (
            "lightning.pytorch.loggers.WandbLogger",
            {
                "save_dir": str(folder),
                "project": "rmr_lightning",
                "group": f"study-{study.task}",
                "name": name,
                "job_type": "study-run",
            },
        ),
    }
    if kind not in classes:
        raise ValueError(f"logger must be one of {sorted(classes) + ['none']}, got {kind!r}")
    class_path, init_args = classes[kind]
    return ["--trainer.logger=" + json.dumps({"class_path": class_path, "init_args": init_args})]


def run_dir(study: Study, variant: str, n_train: int, seed: int) -> Path:
    """The folder of one run: its logs, checkpoints and saved config."""
    return Path(study.output_dir) / "runs" / f"{variant}_n{n_train}_seed{seed}"


def _run_args(study: Study, variant: str, n_train: int, seed: int) -> tuple[str, list[str]]:
    folder = run_dir(study, variant, n_train, seed)
    name = folder.name
    args = [
        "--config",
        study.base_config,
        *study.overrides,
        f"--seed_everything={seed}",
        f"--model.init_args.variant={variant}",
        f"--data.init_args.split.train_size={n_train}",
        f"--data.init_args.split.subset_seed={seed}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *_logger_arg(study.logger, folder, study, name),
    ]
    return name, args


def prepare(study: Study) -> None:
    """Render and cache the cohort once, before runs (possibly in parallel) load it."""
    _, args = _run_args(study, *study.runs()[0])
    cli_main([*args, "--trainer.logger=false"], run=False).datamodule.prepare_data()
    gc.collect()  # the CLI's objects reference each other (see run_one)


def _flag_validation(cli, checkpoint: str) -> dict:
    """Validation metrics of the checkpoint that was tested, where the model has a suspicious-growth flag:
    what a flag setting (e.g. ``loss.flag_weight``) is chosen on, so the test set is not."""
    if getattr(cli.model.model, "flag_head", None) is None:
        return {}
    return cli.trainer.validate(
        cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint or None, verbose=False, weights_only=True
    )[0]


def run_one(study: Study, variant: str, n_train: int, seed: int) -> dict:
    """Fit and test one configuration; returns its row of ``summary.csv``."""
    _, args = _run_args(study, variant, n_train, seed)
    start = time.perf_counter()
    cli = cli_main(args, run=False)
    try:
        setup_data(cli.datamodule, cli.trainer, "fit")  # a bad manifest fails before the run's logger starts
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, weights_only=True)
        checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
        results = cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint or None, verbose=False, weights_only=True
        )[0]
        val = cli.trainer.checkpoint_callback.best_model_score if cli.trainer.checkpoint_callback else None
        flag_val = _flag_validation(cli, checkpoint)
        return {
            "task": study.task,
            "variant": variant,
            "n_train": n_train,
            "seed": seed,
            "test_mae": results.get("test/mae", math.nan),
            "test_r2": results.get("test/r2", math.nan),
            "test_mae_followup": results.get("test/mae_followup", math.nan),
            "test_state_corr": results.get("test/state_corr", math.nan),
            "val_mae": float(val) if val is not None else math.nan,
            "seconds": round(time.perf_counter() - start, 1),
            "checkpoint": checkpoint,
            "processor_artifact": cli.model.hparams.processor_artifact,
            "processor_sha256": cli.model.artifact_sha256,
            "p_check_r2": check.r2 if (check := getattr(cli.model, "processor_check", None)) else math.nan,
            "test_flag_auroc": results.get("test/flag_auroc", math.nan),
            "test_flag_sensitivity": results.get("test/flag_sensitivity_at_90_specificity", math.nan),
            "val_flag_auroc": flag_val.get("val/flag_auroc", math.nan),
            "val_flag_sensitivity": flag_val.get("val/flag_sensitivity_at_90_specificity", math.nan),
            # at the operating point the validation chose (what predictions.csv flags)
            "test_flag_sensitivity_at_threshold": results.get("test/flag_sensitivity_at_threshold", math.nan),
            "test_flag_specificity_at_threshold": results.get("test/flag_specificity_at_threshold", math.nan),
        }
    finally:
        if study.logger == "wandb":  # also after a failed run, or the worker's next run would join its W&B run
            import wandb

            wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
        # trainer, model and datamodule reference each other, so without a full collection every run's
        # cohort stayed in the worker (1.1 GB per run at 2 mm: a worker reached 12 GB and was OOM-killed)
        del cli
        gc.collect()


Cell = tuple[str, int]  # (variant, n_train)


def paired_ratios(frame: pd.DataFrame) -> dict[tuple[Cell, Cell], tuple[float, int]]:
    """The ratios the RMR claims rest on, each of mean test MAE over the seeds both cells have:
    ``rmr`` against every other variant at the two smallest sizes, and ``rmr`` at n against
    ``baseline`` at 4n (4x data efficiency). ``{(cell_a, cell_b): (ratio, seeds)}``."""
    by_seed = frame.groupby(["variant", "n_train", "seed"])["test_mae"].mean()
    cells = set(by_seed.index.droplevel(2))
    sizes = sorted(frame["n_train"].unique())
    pairs = [(("rmr", n), (other, n)) for n in sizes[:2] for other in ("baseline", "scratch", "unfrozen", "random_p")]
    pairs += [(("rmr", n), ("baseline", 4 * n)) for n in sizes]  # every pair of sizes four-fold apart that ran
    ratios = {}
    for a, b in pairs:
        if a not in cells or b not in cells:
            continue
        common = by_seed[a].index.intersection(by_seed[b].index)
        if not common.empty:
            ratios[(a, b)] = (float(by_seed[a][common].mean() / by_seed[b][common].mean()), len(common))
    return ratios


def summarise(frame: pd.DataFrame, measure: str = Study.measure) -> str:
    """Markdown: mean +- std of test MAE (change) per variant and size, and the RMR ratios.

    A cell with fewer seeds than the most complete one (a study cut off by a time limit) says so, and
    each ratio compares two variants on the seeds both have.
    """
    stats = frame.groupby(["variant", "n_train"])["test_mae"].agg(["mean", "std", "count"]).reset_index()
    full = int(stats["count"].max())
    sizes = sorted(frame["n_train"].unique())
    variants = [v for v in VARIANT_ORDER if v in set(frame["variant"])] + sorted(
        set(frame["variant"]) - set(VARIANT_ORDER)
    )
    lines = ["| variant | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for v in variants:
        cells = []
        for n in sizes:
            row = stats[(stats.variant == v) & (stats.n_train == n)]
            if row.empty:
                cells.append("")
                continue
            mean, std, count = row["mean"].iloc[0], row["std"].iloc[0], int(row["count"].iloc[0])
            partial = f" ({count} seed{'s' * (count > 1)})" if count < full else ""
            cells.append(f"{mean:.5f} ± {0 if math.isnan(std) else std:.5f}{partial}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    notes = []
    for (a, b), (value, seeds) in paired_ratios(frame).items():
        text = f"{value:.3f} ({seeds} seed{'s' * (seeds > 1)})"
        if a[1] == b[1]:
            notes.append(f"- n={a[1]}: rmr / {b[0]} = {text}")
        else:
            notes.append(f"- rmr at n={a[1]} / baseline at n={b[1]} = {text} (<= 1: 4x data efficiency)")
    corr = frame.groupby("variant")["test_state_corr"].mean()
    readout = ", ".join(f"{v} {corr[v]:.3f}" for v in variants if v in corr and not math.isnan(corr[v]))
    text = (
        f"Test MAE of the predicted {measure}, mean ± std over "
        f"{full} seed(s); lower is better.\n\n"
        + "\n".join(lines)
        + "\n\nRatios of mean test MAE (paired seeds):\n\n"
        + "\n".join(notes)
        + "\n"
    )
    text += _processor_check_note(frame) + _flag_table(frame, variants, sizes)
    if readout:  # phantoms only: scans of real subjects have no hidden true state
        text += (
            "\nCorrelation of the state decoded by the pretrained g from f'(x) with the hidden true state "
            f"(mean over runs): {readout}\n"
        )
    return text


def _flag_table(frame: pd.DataFrame, variants: list[str], sizes: list[int]) -> str:
    """Markdown: the suspicious-growth flag's test AUROC and sensitivity at 90 % specificity per variant and
    size (mean over seeds), where the runs have one."""
    columns = ["test_flag_auroc", "test_flag_sensitivity"]
    if any(c not in frame for c in columns):
        return ""
    frame = frame.assign(**{c: pd.to_numeric(frame[c], errors="coerce") for c in columns})  # blank cells: NaN
    if frame["test_flag_auroc"].isna().all():
        return ""
    means = frame.groupby(["variant", "n_train"])[columns].mean()
    lines = ["| variant | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for v in variants:
        cells = [
            f"{means.loc[(v, n), 'test_flag_auroc']:.3f} / {means.loc[(v, n), 'test_flag_sensitivity']:.3f}"
            if (v, n) in means.index
            else ""
            for n in sizes
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return (
        "\nSuspicious growth (true doubling time under the flag's threshold), test AUROC / sensitivity at 90 % "
        "specificity of the flag's logit, mean over seeds:\n\n" + "\n".join(lines) + "\n"
    )


def _processor_check_note(frame: pd.DataFrame) -> str:
    """The P check of the variants that use the artifact's P: R^2 of P's change on each run's training set."""
    if "p_check_r2" not in frame:
        return ""
    frame = frame.assign(p_check_r2=pd.to_numeric(frame["p_check_r2"], errors="coerce"))  # blank cells: NaN
    if frame["p_check_r2"].isna().all():
        return ""
    checked = frame.dropna(subset=["p_check_r2"]).groupby("n_train")["p_check_r2"].agg(["mean", "min"])
    cells = ", ".join(f"n={n}: {row['mean']:.3f} (lowest {row['min']:.3f})" for n, row in checked.iterrows())
    return (
        "\nP check, R^2 of the artifact's P's change against the training set's regional changes beyond each "
        f"region's mean (1: P explains them, 0: nothing; mean over runs): {cells}\n"
    )


def plot(frame: pd.DataFrame, path: Path, measure: str = Study.measure) -> None:
    plt = pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7.4, 4.4))
    for variant in [v for v in VARIANT_ORDER if v in set(frame["variant"])]:
        stats = frame[frame.variant == variant].groupby("n_train")["test_mae"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(
            stats.index,
            stats["mean"],
            yerr=stats["std"],
            marker="o",
            capsize=3,
            label=variant,
            lw=2 if variant == "rmr" else 1.2,
            color=f"C{VARIANT_ORDER.index(variant)}",  # one colour per variant in every plot
        )
    ax.set_xscale("log")
    ax.set_xticks(sorted(frame["n_train"].unique()))
    ax.get_xaxis().set_major_formatter(ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(ticker.NullFormatter())  # only the sizes that were run
    ax.set_yscale("log")  # variants differ by factors; a poor one (random_p) would flatten the rest
    low, high = ax.get_ylim()
    decades = math.log10(high / low)
    labelled = set(range(2, 10)) if decades < 0.6 else {2, 3, 5} if decades < 1.2 else {2, 5}  # no overlapping labels

    def minor_label(value: float, _: int) -> str:
        return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in labelled else ""

    ax.get_yaxis().set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.get_yaxis().set_minor_formatter(ticker.FuncFormatter(minor_label))
    ax.set_xlabel("training subjects")
    ax.set_ylabel(f"test MAE of {measure.split(' (')[0]} (log)")
    ax.set_title(f"Sample efficiency: {frame['task'].iloc[0]}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)  # outside: no curve hidden
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=150)
    plt.close(fig)


def log_study_to_wandb(study: Study, frame: pd.DataFrame, out: Path) -> str:
    """One W&B run per study, in the group of its runs (``study-<task>``): every row of ``summary.csv``
    as a table, ``sample_efficiency.png``, ``summary.md``, the paired ratios as summary values and the
    environment. Offline unless the user logged in, like every run. Returns the run's id."""
    import wandb

    run = wandb.init(
        project="rmr_lightning",
        group=f"study-{study.task}",
        job_type="study-summary",
        name=f"{study.task}-summary",
        dir=str(out),
        config={"study": {k: getattr(study, k) for k in study.__dataclass_fields__}, "environment": run_environment()},
        reinit="finish_previous",
    )
    try:
        shown = frame.astype({"checkpoint": str, "processor_artifact": str, "processor_sha256": str})
        run.log(
            {
                "summary_table": wandb.Table(dataframe=shown[COLUMNS]),
                "sample_efficiency": wandb.Image(str(out / "sample_efficiency.png")),
                "summary_md": wandb.Html("<pre>" + html.escape((out / "summary.md").read_text()) + "</pre>"),
            }
        )
        run.summary.update(
            {f"ratio/rmr_n{a[1]}_over_{b[0]}_n{b[1]}": value for (a, b), (value, _) in paired_ratios(frame).items()}
        )
        return run.id
    finally:
        run.finish()


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Exit as soon as the study process that started this worker is gone (SIGTERM, SIGKILL, OOM): an
    orphaned worker would go on writing into the run folder the next study resumes from."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _quiet_worker(threads: int, parent: int) -> None:
    """Initialiser of a study worker process: its share of the CPU threads, Lightning's chatter off, and a
    watch that ends it with its parent."""
    import threading
    import warnings

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _executor(workers: int) -> Executor | None:
    if workers == 1:
        return None
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_quiet_worker,
        initargs=(threads, os.getpid()),
    )


def _task_rows(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The rows of one task: a reused output folder may hold another task's runs, which are neither
    resumed nor summarised. A task name a spreadsheet would read as a formula is stored with a leading
    ``'`` (``files.spreadsheet_safe``) and matched in that form too."""
    return frame[frame["task"].astype(str).isin({task, spreadsheet_safe(task)})].reset_index(drop=True)


def read_summary(csv: Path) -> pd.DataFrame:
    """The rows of ``summary.csv`` (none if it does not exist yet). It is always written whole, so a
    file that does not parse was damaged by something else: the error names it rather than resuming
    from a guess."""
    if not csv.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{csv} cannot be read ({type(err).__name__}: {err}); it is the study's record of finished runs: "
            "repair it, or move it away to run the study again from the start"
        ) from None
    missing = [c for c in ("task", "variant", "n_train", "seed") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{csv} lacks the column(s) {missing} of a study summary (columns: {list(frame.columns)}); "
            "repair or move it away"
        )
    for column in COLUMNS:  # a study begun before a column existed resumes with it empty
        if column not in frame.columns:
            frame[column] = math.nan
    return frame


def _clear_leftovers(study: Study, todo: list[tuple[str, int, int]], done: pd.DataFrame, console: Console) -> None:
    """Remove what killed attempts left: temporary files of the summary's writers, and the folder of
    every run still to do (a run is done only once its row is in ``summary.csv``; its folder may hold a
    killed attempt's logs and checkpoints, which a new attempt would otherwise add to, not replace).
    A folder that holds a run recorded under another task (a reused output folder) is kept."""
    out = Path(study.output_dir)
    for name in SUMMARY_FILES:
        for tmp in out.glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    recorded = [Path(str(p)).resolve() for p in done.get("checkpoint", pd.Series(dtype=object)).dropna() if str(p)]
    for run in todo:
        folder = run_dir(study, *run)
        if not folder.exists():
            continue
        if any(folder.resolve() in p.parents for p in recorded):
            console.print(f"[yellow]{folder} holds a run of another task: kept, and this task's run adds to it[/]")
            continue
        shutil.rmtree(folder)


def _runs_to_do(study: Study, csv: Path, done: pd.DataFrame, console: Console) -> list[tuple[str, int, int]]:
    """The study's runs not yet in ``summary.csv``; leftovers of killed runs are cleared first."""
    mine = _task_rows(done, study.task)
    finished = {(r.variant, int(r.n_train), int(r.seed)) for r in mine.itertuples()}
    todo = [r for r in study.runs() if r not in finished]
    _clear_leftovers(study, todo, done, console)
    if len(mine) < len(done):  # another task's rows (a reused output_dir): kept in the file, not resumed or summarised
        others = ", ".join(sorted(set(done["task"].astype(str)) - {study.task}))
        console.print(
            f"[yellow]{csv} also holds {len(done) - len(mine)} runs of task(s) {others}: "
            f"only task {study.task} is resumed and summarised[/]"
        )
    console.print(f"[bold]rmr-study[/]: {len(todo)} runs to go ({len(finished)} of task {study.task} already in {csv})")
    return todo


def _execute(study: Study, todo: list[tuple[str, int, int]], csv: Path, done: pd.DataFrame, console: Console) -> None:
    """Run ``todo`` (``workers`` at a time) under a progress bar; ``summary.csv`` is rewritten after each run."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns += [TextColumn("ETA"), TimeRemainingColumn()]
    if todo:
        prepare(study)
    executor = _executor(study.workers)
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("study", total=len(todo))

        def record(row: dict) -> None:
            nonlocal done
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
            atomic_write_csv(csv, done[COLUMNS])  # after every run, whole or not at all: nothing finished is lost
            progress.advance(task)
            progress.console.print(
                f"  {row['variant']:9s} n={row['n_train']:<4d} seed={row['seed']}: test MAE {row['test_mae']:.5f}  "
                f"(follow-up {row['test_mae_followup']:.5f})  "
                f"R2 {row['test_r2']:.3f}  ({row['seconds']:.0f} s)"
            )

        if executor is None:
            for k, (variant, n, seed) in enumerate(todo, 1):
                progress.update(task, description=f"run {k}/{len(todo)}: {variant} n={n} seed={seed}")
                record(run_one(study, variant, n, seed))
            return
        with executor:
            progress.update(task, description=f"{len(todo)} runs, {study.workers} at a time")
            futures = [executor.submit(run_one, study, *run) for run in todo]
            for future in as_completed(futures):
                record(future.result())


def _report(study: Study, frame: pd.DataFrame, out: Path) -> None:
    """summary.md, the sample-efficiency plot and the environment beside summary.csv (and W&B if chosen)."""
    shown, measure = frame, study.measure
    if frame["test_mae"].isna().all() and frame["test_mae_followup"].notna().any():
        # scans without baseline values (a manifest without baseline columns) have no change to score
        shown, measure = (
            frame.assign(test_mae=frame["test_mae_followup"]),
            "follow-up value (no baseline values: no change to score)",
        )
    atomic_write_text(out / "summary.md", summarise(shown, measure))
    plot(shown, out / "sample_efficiency.png", measure)
    atomic_write_json(out / ENVIRONMENT_FILE, run_environment())
    if study.logger == "wandb":
        log_study_to_wandb(study, shown, out)


def run_study(study: Study) -> pd.DataFrame:
    """Every (variant, size, seed) run not yet in ``summary.csv``, then the summary of the task's runs."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, console = out / "summary.csv", Console()
    done = read_summary(csv)
    _execute(study, _runs_to_do(study, csv, done, console), csv, done, console)
    frame = _task_rows(read_summary(csv), study.task)
    _report(study, frame, out)
    console.print((out / "summary.md").read_text())
    return frame


def parse_study(args: list[str] | None = None) -> Study:
    """``--config study.yaml`` and/or ``--field value`` into a ``Study``."""
    parser = ArgumentParser(prog="rmr-study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a study YAML (configs/study/*.yaml)")
    parser.add_class_arguments(Study)
    cfg = parser.parse_args(args)
    cfg.pop("config", None)
    return Study(**cfg.as_dict())


def main(args: list[str] | None = None) -> None:
    """Console script ``rmr-study --config configs/study/brain_mri.yaml``."""
    run_study(parse_study(args))


if __name__ == "__main__":
    main()
