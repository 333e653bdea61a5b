"""A study killed at random moments (SIGKILL: no handler runs, nothing is flushed) resumes every time
without error, never reads a half-written file, redoes the run it was in from an empty folder, never
redoes a finished run, and ends with every run in ``summary.csv`` exactly once."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rmr_lightning.study import COLUMNS, SUMMARY_FILES, Study, _clear_leftovers, prepare, read_summary, run_dir
from tests.helpers import tiny_study

MIN_KILLS = 10


def _attempt(config: str, log: str) -> None:
    """``rmr-study --config config`` (the console script's ``main``) in a process forked from a server that
    imported the package once: a fresh interpreter spends ~8 s importing torch and Lightning, eleven times
    over. Its output goes to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from rmr_lightning.study import main

    main(["--config", config])


def _keys(frame: pd.DataFrame) -> list[tuple[str, int, int]]:
    return [(r.variant, int(r.n_train), int(r.seed)) for r in frame.itertuples()]


def _whole_summary(csv: Path, runs: int) -> pd.DataFrame:
    """summary.csv as a resume reads it: it parses, has the columns, no run twice, no half row."""
    frame = read_summary(csv)
    assert list(frame.columns) == COLUMNS, list(frame.columns)
    keys = _keys(frame)
    assert len(keys) == len(set(keys)) <= runs, keys
    assert frame[["test_mae", "seconds"]].notna().all().all() and all(Path(p).is_file() for p in frame["checkpoint"]), (
        frame
    )
    return frame


@pytest.mark.slow
def test_study_killed_at_random_moments_resumes_to_every_run_once(tiny_artifact: Path, tmp_path: Path) -> None:
    study = tiny_study(tiny_artifact, tmp_path / "study", "kill", [0, 1])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({k: getattr(study, k) for k in study.__dataclass_fields__}))
    out, runs, csv = Path(study.output_dir), len(study.runs()), Path(study.output_dir) / "summary.csv"
    prepare(study)  # the cohort cache (written atomically on its own): the kills land in the study, not in rendering
    rng = random.Random(18)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rmr_lightning.study", "tests.test_study_kill"])
    start = time.perf_counter()
    first_rows, per_runs = (
        [3.0],
        [2.0],
    )  # seconds from an attempt's start to its first row, and between rows, as measured
    kills, progress, finished_at = [], [], {}  # delay of each kill; rows when it came; each finished run as first seen
    for attempt in range(3 * MIN_KILLS):
        done = _whole_summary(csv, runs) if csv.exists() else pd.DataFrame(columns=COLUMNS)
        for key, row in zip(_keys(done), done.itertuples(), strict=True):
            finished_at.setdefault(key, (row.seconds, row.checkpoint, Path(row.checkpoint).stat().st_mtime_ns))
        if len(kills) >= MIN_KILLS:
            break
        # kills spread over the study: each attempt gets on average the time of its share of the remaining runs,
        # and never the time to finish them all while kills are still to come
        remaining, left = runs - len(done), MIN_KILLS - len(kills)
        typical = statistics.median(first_rows) + (remaining / (left + 1) - 0.25) * statistics.median(per_runs)
        delay = max(0.05, min(rng.uniform(0.0, 2.0 * typical), min(first_rows) + (remaining - 1.5) * min(per_runs)))
        log = tmp_path / f"attempt{attempt}.log"
        process = context.Process(target=_attempt, args=(str(config), str(log)))
        process.start()
        began, rows, row_times = time.perf_counter(), len(done), []
        while process.is_alive() and (elapsed := time.perf_counter() - began) < delay:
            if csv.exists() and len(_whole_summary(csv, runs)) > rows:  # read while it is rewritten: always whole
                rows += 1
                row_times.append(elapsed)
            time.sleep(min(0.05, max(0.0, delay - elapsed)))
        if process.is_alive():
            process.kill()
            process.join()
            assert process.exitcode == -signal.SIGKILL
            kills.append(delay)
            progress.append(len(done))
        text = log.read_text() if log.exists() else ""
        assert process.exitcode in (0, -signal.SIGKILL) and "Traceback" not in text, text[-3000:]
        if "runs to go" in text:  # it read the whole summary.csv that the last attempt left
            assert f"rmr-study: {remaining} runs to go" in text, text[:2000]
        first_rows += row_times[:1]
        per_runs += [b - a for a, b in zip(row_times, row_times[1:], strict=False)]
    assert len(kills) >= MIN_KILLS, f"the study finished after {len(kills)} kills: give it more runs"
    killed_s = time.perf_counter() - start

    # the last resume runs what is left and writes the summary
    log = tmp_path / "last.log"
    process = context.Process(target=_attempt, args=(str(config), str(log)))
    process.start()
    process.join(300)
    assert process.exitcode == 0, log.read_text()[-3000:]
    frame = _whole_summary(csv, runs)
    assert sorted(_keys(frame)) == sorted(study.runs())  # every run exactly once
    # runs finished before a kill were not redone: same row, same checkpoint, untouched since
    assert len(finished_at) >= 2 and max(progress) >= 2, (
        progress
    )  # kills came after runs had finished, not only at the start
    for key, (seconds, checkpoint, mtime) in finished_at.items():
        row = frame[(frame.variant == key[0]) & (frame.n_train == key[1]) & (frame.seed == key[2])].iloc[0]
        assert (row.seconds, row.checkpoint) == (seconds, checkpoint) and Path(
            checkpoint
        ).stat().st_mtime_ns == mtime, key
    # a redone run started from an empty folder: one attempt's logs and checkpoints, not a killed one's beside them
    for key in study.runs():
        folder = run_dir(study, *key)
        assert [p.name for p in (folder / "logs").iterdir()] == ["version_0"], key
        assert len(list((folder / "checkpoints").glob("*.ckpt"))) == 2, sorted(
            os.listdir(folder / "checkpoints")
        )  # best and last
    # no partial file: nothing temporary left, every CSV and JSON parses
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for path in out.rglob("*.csv"):
        pd.read_csv(path)
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert all((out / name).stat().st_size > 0 for name in SUMMARY_FILES)
    print(
        f"\n{len(kills)} kills after {', '.join(f'{d:.1f}' for d in kills)} s, rows then {progress}; "
        f"{len(finished_at)} of {runs} runs finished before the last kill; "
        f"kill phase {killed_s:.0f} s, total {time.perf_counter() - start:.0f} s"
    )


def _row(study: Study, variant: str, n_train: int, seed: int, task: str | None = None) -> dict:
    checkpoint = run_dir(study, variant, n_train, seed) / "checkpoints" / "last.ckpt"
    return {c: 1.0 for c in COLUMNS} | {
        "task": task or study.task,
        "variant": variant,
        "n_train": n_train,
        "seed": seed,
        "checkpoint": str(checkpoint),
    }


def test_resume_clears_a_killed_runs_folder_and_keeps_finished_ones(tmp_path: Path) -> None:
    study = Study(
        base_config="configs/natural/brain_mri.yaml",
        output_dir=str(tmp_path),
        task="t",
        variants=["rmr", "baseline"],
        train_sizes=[2],
        seeds=[0],
    )
    for key in study.runs():
        (run_dir(study, *key) / "checkpoints").mkdir(parents=True)
        (run_dir(study, *key) / "checkpoints" / "last.ckpt").write_text("x")
    (tmp_path / "summary.csv.abc123.tmp").write_text("task,vari")  # a write the kill cut short
    (tmp_path / "notes.txt.tmp").write_text("not the study's")
    done = pd.DataFrame([_row(study, "rmr", 2, 0)])
    from rich.console import Console

    _clear_leftovers(study, [("baseline", 2, 0)], done, Console(quiet=True))
    assert (run_dir(study, "rmr", 2, 0) / "checkpoints" / "last.ckpt").is_file()  # finished: kept
    assert not run_dir(study, "baseline", 2, 0).exists()  # killed midway: redone from scratch
    assert not (tmp_path / "summary.csv.abc123.tmp").exists() and (tmp_path / "notes.txt.tmp").exists()
    # a folder holding another task's recorded run (a reused output folder) is not deleted
    (run_dir(study, "baseline", 2, 0) / "checkpoints").mkdir(parents=True)
    (run_dir(study, "baseline", 2, 0) / "checkpoints" / "last.ckpt").write_text("x")
    _clear_leftovers(
        study, [("baseline", 2, 0)], pd.DataFrame([_row(study, "baseline", 2, 0, task="other")]), Console(quiet=True)
    )
    assert (run_dir(study, "baseline", 2, 0) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("text", ["", 'task,variant\n"rmr,2\n', "\xff\xfe\x00garbage", "a,b\n1,2\n"])
def test_an_unreadable_summary_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    csv = tmp_path / "summary.csv"
    csv.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(csv))):
        read_summary(csv)


_ORPHAN_SCRIPT = """
import sys, time
from rmr_lightning.study import _executor
executor = _executor(2)
futures = [executor.submit(time.sleep, 120) for _ in range(2)]
time.sleep(0.5)
while len(executor._processes) < 2:
    time.sleep(0.1)
print(" ".join(str(pid) for pid in executor._processes), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_study_workers_exit_with_the_study_process(sig: signal.Signals, tmp_path: Path) -> None:
    """Killing ``rmr-study`` (not its process group) ends its worker processes too, within seconds, instead
    of leaving them running the current run into the folder the next study resumes from."""
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(1.0)  # the workers' initialiser (torch import, the watch) has run while tasks were queued
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in workers if _alive(pid)]
        assert not alive, f"workers {alive} outlived the study process"
    finally:
        parent.kill()
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie reaped by init or not, it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
