"""The study runner end to end on a tiny cohort: files, columns, resume, and the summary it writes."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pandas as pd
import pytest

from datamodules.brain_phantom import BrainPhantomDataModule
from rmr_lightning.study import (
    COLUMNS,
    Study,
    log_study_to_wandb,
    paired_ratios,
    parse_study,
    plot,
    run_study,
    summarise,
)
from tests.helpers import tiny_natural, tiny_study


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_study_writes_summary_plot_and_resumes(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = tiny_study(tiny_artifact, tmp_path / "study", "tiny", [0])
    # a reused output folder holding another task's run of the same variant, size and seed: not resumed, not summarised
    out = Path(study.output_dir)
    out.mkdir(parents=True)
    other = {c: "" for c in COLUMNS} | {
        "task": "other",
        "variant": "rmr",
        "n_train": 2,
        "seed": 0,
        "test_mae": 99.0,
        "test_mae_followup": 99.0,
    }
    pd.DataFrame([other], columns=COLUMNS).to_csv(out / "summary.csv", index=False)
    cohorts: weakref.WeakSet = weakref.WeakSet()
    setups: list[str] = []
    setup = BrainPhantomDataModule.setup
    monkeypatch.setattr(
        BrainPhantomDataModule,
        "setup",
        lambda self, stage=None: (cohorts.add(self), setups.append(stage), setup(self, stage))[-1],
    )
    gc.disable()  # Python's own full collections come at unpredictable times; only the runner's may free the runs
    try:
        frame = run_study(study)
    finally:
        gc.enable()
    # each run's datamodule (and the cohort it holds, 1.1 GB at 2 mm) is freed when the run ends
    # setup runs before the logger starts (validation), again inside fit (idempotent) and for test
    assert setups.count("fit") == 8 and len(cohorts) <= 1, (len(cohorts), setups)
    assert (out / "summary.md").is_file() and "99.0" not in (out / "summary.md").read_text()
    assert pd.read_csv(out / "summary.csv")["task"].tolist().count("other") == 1
    assert (out / "summary.md").is_file() and (out / "sample_efficiency.png").stat().st_size > 10_000
    assert list(frame.columns) == COLUMNS and len(frame) == 4
    assert set(frame["variant"]) == {"rmr", "baseline"} and frame["test_mae"].gt(0).all()
    assert all(Path(p).is_file() for p in frame["checkpoint"])
    assert frame["processor_sha256"].nunique() == 1
    assert (out / "runs" / "rmr_n2_seed0" / "logs").is_dir()
    assert json.loads((out / "environment.json").read_text())["packages"]["torchio"]
    # a second call finds every run done and trains nothing
    before = (out / "summary.csv").read_text()
    again = run_study(study)
    assert len(again) == 4 and (out / "summary.csv").read_text() == before


def test_summary_reports_the_ratios_the_claims_rest_on() -> None:
    rows = []
    for variant, scale in (("rmr", 1.0), ("baseline", 2.0), ("scratch", 1.5)):
        for n in (8, 16, 64):
            for seed in (0, 1, 2):
                rows.append(
                    {
                        "task": "t",
                        "variant": variant,
                        "n_train": n,
                        "seed": seed,
                        "test_mae": scale / n + 0.001 * seed,
                        "test_state_corr": 0.5,
                    }
                )
    text = summarise(pd.DataFrame(rows))
    assert "n=8: rmr / baseline = 0.5" in text and "rmr at n=16 / baseline at n=64" in text
    assert "rmr at n=8 /" not in text  # no baseline at n=32 to compare with
    assert "| rmr |" in text and "3 seed(s)" in text and "hidden true state (mean over runs): rmr 0.500" in text
    # scans of real subjects (a manifest) have no hidden state: no empty correlation line
    assert "hidden true state" not in summarise(pd.DataFrame(rows).assign(test_state_corr=float("nan")))
    # a study cut off before rmr's last seed at n=16: the cell and the ratio say so, pairing seeds
    cut = pd.DataFrame([r for r in rows if not (r["variant"] == "rmr" and r["n_train"] == 16 and r["seed"] == 2)])
    text = summarise(cut)
    assert "(2 seeds)" in text.split("| rmr |")[1].split("\n")[0]
    paired = (1 / 16 + 0.0005) / (2 / 16 + 0.0005)  # seeds 0 and 1 only
    assert f"n=16: rmr / baseline = {paired:.3f} (2 seeds)" in text


def test_wandb_study_run_logs_the_table_plot_ratios_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [
        {c: "" for c in COLUMNS}
        | {
            "task": "t",
            "variant": v,
            "n_train": n,
            "seed": seed,
            "test_mae": scale / n,
            "test_r2": 0.5,
            "test_mae_followup": 0.01,
            "test_state_corr": 0.5,
            "val_mae": 0.01,
            "seconds": 1.0,
        }
        for v, scale in (("rmr", 1.0), ("baseline", 2.0))
        for n in (8, 16, 64)
        for seed in (0, 1)
    ]
    frame = pd.DataFrame(rows)
    plot(frame, tmp_path / "sample_efficiency.png")
    (tmp_path / "summary.md").write_text(summarise(frame))
    study = Study(base_config="configs/natural/brain_mri.yaml", output_dir=str(tmp_path), task="t", logger="wandb")
    run_id = log_study_to_wandb(study, frame, tmp_path)
    run_dir = next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    table = json.loads(next(run_dir.rglob("media/table/summary_table_*.table.json")).read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == len(frame)
    assert (
        next(run_dir.rglob("media/images/sample_efficiency_*.png")).read_bytes()
        == (tmp_path / "sample_efficiency.png").read_bytes()
    )
    record = next(run_dir.glob("run-*.wandb")).read_bytes()  # config and summary live in the run's log
    assert b"ratio/rmr_n8_over_baseline_n8" in record and b"ratio/rmr_n16_over_baseline_n64" in record
    assert b"study-t" in record and b"cpu_capability" in record
    assert paired_ratios(frame)[(("rmr", 8), ("baseline", 8))] == (0.5, 2)


def test_parse_study_reads_yaml_and_flags() -> None:
    study = parse_study(["--config", "configs/study/demo.yaml", "--seeds=[0]"])
    assert study.seeds == [0] and study.base_config == "configs/natural/brain_mri.yaml"
    with pytest.raises(SystemExit):
        parse_study(["--no_such_field=1"])


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_parallel_workers_give_the_runs_of_a_sequential_study(tiny_artifact: Path, tmp_path: Path) -> None:
    frames = {}
    for workers in (1, 2):
        study = Study(
            base_config="configs/natural/brain_mri.yaml",
            output_dir=str(tmp_path / f"w{workers}"),
            variants=["rmr", "scratch"],
            train_sizes=[4],
            seeds=[0],
            overrides=[*tiny_natural(tiny_artifact), "--trainer.max_steps=3", "--trainer.val_check_interval=3"],
            logger="none",
            workers=workers,
        )
        frames[workers] = run_study(study).sort_values("variant").reset_index(drop=True)
    assert len(frames[2]) == 2 and frames[2]["variant"].tolist() == ["rmr", "scratch"]
    # one thread per worker instead of two changes only the order of float sums
    pd.testing.assert_series_equal(frames[1]["test_mae"], frames[2]["test_mae"], rtol=1e-4)
    with pytest.raises(ValueError, match="workers"):
        Study(base_config="configs/natural/brain_mri.yaml", workers=0)
