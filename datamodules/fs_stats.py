"""FreeSurfer stats files (``aseg.stats``, ``?h.aparc.stats``) read and written as DK84 regional volumes.

Reading follows ``asegstats2table``/``aparcstats2table``: the ``# ColHeaders`` line names the columns of
the whitespace-separated rows below it, and ``# Measure`` lines carry global measures such as eTIV.
aseg.stats gives subcortical ``Volume_mm3`` by ``StructName`` (FreeSurfer 6 ``Left-Thalamus-Proper``,
7 ``Left-Thalamus``; see ``SUBCORTICAL``); ``?h.aparc.stats`` gives cortical ``GrayVol`` per region.
FastSurfer writes the same formats (its DKT stats as ``?h.aparc.DKTatlas.mapped.stats``).
"""

from __future__ import annotations

from pathlib import Path

from datamodules.freesurfer import CORTICAL, SUBCORTICAL
from rmr_lightning.files import atomic_write_text

#: ``# Measure`` keys that hold the intracranial volume (FreeSurfer >= 5.3, then older ICV).
ETIV_KEYS = ("EstimatedTotalIntraCranialVol", "IntraCranialVol")


class StatsError(ValueError):
    """A stats file that cannot be parsed; the message names the file and the problem."""


def read_table(path: Path) -> tuple[dict[str, float], list[dict[str, str]]]:
    """A stats file as (measures {key: value}, rows [{column: cell}]), as asegstats2table reads it."""
    measures, header, rows = {}, None, []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if line.startswith("# Measure "):
            parts = [p.strip() for p in line[len("# Measure ") :].split(",")]
            try:
                measures[parts[0]] = float(parts[3])
            except (IndexError, ValueError):
                raise StatsError(f"{path}:{number}: malformed measure line {line!r}") from None
        elif line.startswith("# ColHeaders"):
            header = line.split()[2:]
        elif line.strip() and not line.startswith("#"):
            if header is None:
                raise StatsError(f"{path}:{number}: data row before the '# ColHeaders' line")
            cells = line.split()
            if len(cells) < len(header):
                raise StatsError(f"{path}:{number}: {len(cells)} cells for {len(header)} columns")
            rows.append(dict(zip(header, cells, strict=False)))
    if header is None:
        raise StatsError(f"{path}: no '# ColHeaders' line; not a FreeSurfer stats file")
    return measures, rows


def _number(row: dict[str, str], column: str, path: Path) -> float:
    try:
        return float(row[column])
    except KeyError:
        raise StatsError(f"{path}: no {column} column") from None
    except ValueError:
        raise StatsError(f"{path}: {row.get('StructName')}: {column} {row[column]!r} is not a number") from None


def read_aseg(path: Path) -> tuple[dict[str, float], float | None]:
    """DK84 subcortical volumes (mm^3) by region name and eTIV (None when the file has none)."""
    measures, rows = read_table(path)
    by_name = {row.get("StructName"): row for row in rows}
    volumes = {}
    for stem, _, names in SUBCORTICAL:
        for side, hemi in (("L", "Left"), ("R", "Right")):
            row = next((by_name[f"{hemi}-{n}"] for n in names if f"{hemi}-{n}" in by_name), None)
            if row is not None:
                volumes[f"{stem}_{side}"] = _number(row, "Volume_mm3", path)
    etiv = next((measures[k] for k in ETIV_KEYS if k in measures), None)
    return volumes, etiv


def read_aparc(path: Path, hemisphere: str) -> dict[str, float]:
    """DK84 cortical grey-matter volumes (``GrayVol``, mm^3) of one hemisphere (``lh``/``rh``)."""
    side = {"lh": "L", "rh": "R"}[hemisphere]
    _, rows = read_table(path)
    names = {fs_name: stem for stem, fs_name, _ in CORTICAL}
    return {
        f"{names[row['StructName']]}_{side}": _number(row, "GrayVol", path)
        for row in rows
        if row.get("StructName") in names
    }


def write_aseg(path: Path, volumes: dict[str, float], voxels: dict[str, int], etiv: float, subject: str) -> None:
    """An aseg.stats for DK84 subcortical ``volumes`` (region name -> mm^3; FreeSurfer 7 names)."""
    lines = [
        "# Title Segmentation Statistics",
        f"# subjectname {subject}",
        "# generating_program rmr-data phantoms (partial-volume grey matter of a rendered phantom)",
        f"# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated Total Intracranial Volume, {etiv:.6f}, mm^3",
        "# NTableCols 5",
        "# ColHeaders  Index SegId NVoxels Volume_mm3 StructName",
    ]
    index = 0
    for stem, labels, names in SUBCORTICAL:
        for side, hemi, label in (("L", "Left", labels[0]), ("R", "Right", labels[1])):
            if f"{stem}_{side}" in volumes:
                index += 1
                lines.append(
                    f"{index:3d} {label:5d} {voxels[f'{stem}_{side}']:8d} "
                    f"{volumes[f'{stem}_{side}']:12.4f}  {hemi}-{names[0]}"
                )
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_aparc(path: Path, hemisphere: str, volumes: dict[str, float], voxels: dict[str, int], subject: str) -> None:
    """A ?h.aparc.stats whose ``GrayVol`` holds the cortical ``volumes`` of one hemisphere (mm^3).

    A phantom has no surfaces: NumVert is the region's voxel count and the surface columns are 0.
    """
    side = {"lh": "L", "rh": "R"}[hemisphere]
    lines = [
        "# Table of FreeSurfer cortical parcellation anatomical statistics",
        f"# subjectname {subject}",
        f"# hemi {hemisphere}",
        "# generating_program rmr-data phantoms (partial-volume grey matter of a rendered phantom)",
        "# NTableCols 10",
        "# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg ThickStd MeanCurv GausCurv FoldInd CurvInd",
    ]
    for stem, fs_name, _ in CORTICAL:
        name = f"{stem}_{side}"
        if name in volumes:
            lines.append(f"{fs_name:<40s} {voxels[name]:6d} 0 {volumes[name]:.4f} 0 0 0 0 0 0")
    atomic_write_text(path, "\n".join(lines) + "\n")
