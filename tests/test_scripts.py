"""Scripts users run by hand: the processor check before fine-tuning reports numbers and refuses a mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, subprocess_env


def _check(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/processor_on_phantoms.py", "--subjects", "16", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_processor_check_reports_its_accuracy_on_cohort_states(tiny_artifact: Path) -> None:
    result = _check("--artifact", str(tiny_artifact))
    assert result.returncode == 0, result.stderr[-2000:]
    r2 = float(result.stdout.split("R^2 of the change ")[1].split(",")[0])
    assert r2 < 1.0 and "regions below 0.01" in result.stdout


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_processor_check_refuses_an_artifact_of_another_algorithm(tiny_artifact: Path) -> None:
    result = _check("--artifact", str(tiny_artifact), "--algorithm", "fkpp")
    assert result.returncode != 0 and "was pretrained with parameters ['gamma', 't']" in result.stderr
