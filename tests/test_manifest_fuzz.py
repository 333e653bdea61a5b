"""Fuzzing the manifest reader: malformed CSV files and cells give a ManifestError, never another exception."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.manifest import ManifestDataModule, ManifestError
from tests.test_manifest import REGIONS, SMALL, synthetic_row

COLUMNS = ["subject_id", "image", "label_map", "label_scheme", "age", "horizon", *REGIONS, "base_reg_a", "extra"]
NASTY = [
    "",
    " ",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "NaN",
    "0x10",
    "1,5",
    "=cmd|' /C calc'!A0",
    "../../etc/passwd",
    "\x00",
    "scans",
    "scans/",
    "scans/sub-00_t1.nii.gz",
    "scans/sub-00_dk.nii.gz",
    "aparc+aseg",
    "dk84",
    "é",
    '"',
    "\n",
    "sub-00",
    "/",
    "~",
    "-1",
    "1e-300",
    "9" * 400,
]
cells = st.one_of(
    st.sampled_from(NASTY), st.text(max_size=30), st.floats(allow_nan=True).map(str), st.integers().map(str)
)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A folder with two real subjects' files, so some fuzzed paths point at real scans."""
    folder = tmp_path_factory.mktemp("fuzz")
    for i in range(2):
        synthetic_row(folder, i)
    return folder


def _csv(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=10),
    rows=st.lists(st.lists(cells, min_size=0, max_size=12), min_size=0, max_size=4),
)
def test_malformed_cells_give_a_manifest_error(study, tmp_path_factory, header, rows):
    manifest = study / "fuzz.csv"
    manifest.write_text(_csv(header, rows), encoding="utf-8", errors="surrogatepass")
    dm = ManifestDataModule(str(manifest), cache_dir=str(study / "cache"), **SMALL)
    with contextlib.suppress(ManifestError):
        dm.setup("fit")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=400))
def test_arbitrary_bytes_give_a_manifest_error(study, content):
    manifest = study / "bytes.csv"
    manifest.write_bytes(content)
    with contextlib.suppress(ManifestError):
        ManifestDataModule(str(manifest), cache_dir=str(study / "cache"), **SMALL).setup("fit")
