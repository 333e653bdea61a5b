"""Build a manifest from a longitudinal BIDS dataset with FreeSurfer or FastSurfer outputs per session.

    rmr-data bids DATASET [--derivatives DIR] -o MANIFEST [--follow-up last|next] [--suffix T1w]

Scans: the T1w image of each subject and session, found with pybids (``sub-X/ses-Y/anat/*_T1w.nii[.gz]``;
the first by path where a session has several runs). Ages come from the ``age`` column of
``sub-X/sub-X_sessions.tsv``, else from ``participants.tsv`` (taken as the age at the subject's first
session; later ages add the ``acq_time`` difference); dates from the ``acq_time`` column of sessions.tsv.
A ``split`` column of participants.tsv (train, val, test: a predefined split) is copied into the manifest.
Segmentations come from DIR (default ``DATASET/derivatives/freesurfer``), per session: FreeSurfer's
longitudinal stream ``sub-X_ses-Y.long.*`` (preferred: less noisy), its cross-sectional ``sub-X_ses-Y``,
or BIDS-derivatives style ``sub-X/ses-Y``. Label map ``mri/aparc+aseg.mgz`` (scheme ``aparc+aseg``), else
FastSurfer's ``mri/aparc.DKTatlas+aseg[.mapped|.deep].mgz`` (``aparc.DKTatlas+aseg``, which lacks six DK
regions: they stay empty in the manifest). The manifest's image is the BIDS scan when it lies on the
label map's voxel grid, else FreeSurfer's conformed copy of it, ``mri/orig.mgz`` (the manifest needs
the label map in the image's voxel space).

Regional volumes: from ``stats/aseg.stats`` (subcortical ``Volume_mm3``) and ``stats/?h.aparc.stats``
(cortical ``GrayVol``; FastSurfer ``?h.aparc.DKTatlas[.mapped].stats``) when both sessions of a pair
have all three, else from voxel counts of both label maps times the voxel volume (never mixed in a pair).

Pairs: the baseline is a subject's earliest session with a label map (by ``acq_time``, else age, else
label), the follow-up its last later session (``--follow-up last``, the default: the longest horizon
carries the most atrophy signal) or the next (``next``); a follow-up that cannot be used gives way to
the one before (after). ``horizon`` is the time between them in years (days / 365.25) from ``acq_time``,
else from the two ages. One manifest row per subject.

The measure, per region and session, is the fraction of a reference grey-matter volume that is missing::

    m = 1 - (V * eTIV_ref / eTIV) / V_ref

V is the region's volume, eTIV the subject's intracranial volume (the mean over the pair's aseg.stats,
one value for both sessions, so the change reflects the region alone; no head-size correction without
it) and V_ref, eTIV_ref those of the reference brain: the MNI152 2009c template's grey matter in each DK
region (the atlas this package ships) on a grid of the label map's voxel size, measured as V is:
partial volumes (the template's GM fraction summed over the region) for stats, voxel counts where grey
matter is the largest tissue fraction (as a hard segmentation labels cortex) for label maps, so the
grid's partial voluming cancels. Why this one: it rises with atrophy as the phantom targets do
(``regional_atrophy`` is exactly the grey-matter fraction lost: a phantom's m *is* its simulated
atrophy); it is comparable across subjects of different head size (eTIV scaling, the usual
proportion-of-ICV correction) and across regions of different size (a fraction, not mm^3); and the
baseline keeps the subject's state (a ratio to the subject's own baseline would make every baseline 0).
The follow-up minus baseline is the volume lost over the horizon as a fraction of the normative volume.
On real data a method offset (FreeSurfer versus the template's tissue maps) shifts each region's m by a
constant, which a model's decoder absorbs. The shipped atlas has no subcortical labels, so subcortical
regions use the cohort's own reference: the median eTIV-scaled baseline volume over the rows whose
volumes were measured the same way.

Excluded (listed with the reason in ``MANIFEST_excluded.csv`` beside the manifest, summarised on the
console): subjects with one session, sessions without FreeSurfer output or without stats and label map,
no session with a label map, unreadable stats or label maps, no dates and no ages, no age, no follow-up
after the baseline, a label map on no grid of the scan. ``subject_id`` is the BIDS participant label
(``sub-001``) and nothing else; no date reaches the manifest; every file is written atomically.
"""

from __future__ import annotations

import argparse
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from datamodules.freesurfer import freesurfer_labels, scheme_absent
from datamodules.fs_stats import StatsError, read_aparc, read_aseg
from datamodules.manifest import dk84_region_names
from datamodules.scan_checks import AFFINE_ATOL
from rmr_lightning.files import atomic_write_csv

DAYS_PER_YEAR = 365.25
#: Label maps in the order they are looked for, with their scheme.
LABEL_MAPS = (
    ("aparc+aseg.mgz", "aparc+aseg"),
    ("aparc.DKTatlas+aseg.mapped.mgz", "aparc.DKTatlas+aseg"),
    ("aparc.DKTatlas+aseg.mgz", "aparc.DKTatlas+aseg"),
    ("aparc.DKTatlas+aseg.deep.mgz", "aparc.DKTatlas+aseg"),
)
#: Cortical stats file stems per scheme (``lh.<stem>.stats``), in the order they are looked for.
APARC_STATS = {"aparc+aseg": ("aparc",), "aparc.DKTatlas+aseg": ("aparc.DKTatlas.mapped", "aparc.DKTatlas", "aparc")}
FOLLOW_UPS = ("last", "next")
#: How a pair's volumes were measured (the manifest's ``volume_source`` column).
STATS, COUNTS = "stats", "voxel counts"
COLUMNS = [
    "subject_id",
    "image",
    "label_map",
    "label_scheme",
    "age",
    "horizon",
    "baseline_session",
    "followup_session",
    "volume_source",
]
REPORT_COLUMNS = ["subject_id", "session_id", "reason", "detail", "subject_kept"]


class Excluded(Exception):
    """A subject or session the manifest cannot use: ``reason`` (short, for counting) and ``detail``."""

    def __init__(self, reason: str, detail: str, session: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.session = reason, detail, session


@dataclass
class Session:
    """One subject's session: the scan, its date and age, and the segmentation found for it."""

    subject: str  # "sub-001"
    session: str  # "ses-01"
    image: Path
    date: pd.Timestamp | None = None
    age: float | None = None
    fs_dir: Path | None = None
    label_map: Path | None = None
    scheme: str = ""
    stats: tuple[Path, Path, Path] | None = None  # aseg, lh, rh


@dataclass(frozen=True)
class Reference:
    """The reference brain on one grid: each DK84 region's grey matter (mm^3, NaN where the atlas has none)
    measured as stats measure it and as label-map voxel counts do, and the intracranial volume."""

    partial: np.ndarray  # (R,) GM fraction summed over the region's voxels x voxel volume
    counted: np.ndarray  # (R,) voxels of the region where GM is the largest tissue x voxel volume
    etiv: float

    def of(self, source: str) -> np.ndarray:
        return self.partial if source == STATS else self.counted


# ---- the measure -----------------------------------------------------------------------------------
def gm_majority(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """Voxels a hard segmentation calls grey matter: GM is the largest of the three tissue fractions."""
    return (gm > 0) & (gm >= wm) & (gm >= csf)


def _reference(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, labels: np.ndarray, voxel: float) -> Reference:
    """Reference volumes of the DK84 regions from tissue fractions and an atlas on one grid."""
    regions, labels = len(dk84_region_names()), labels.ravel()
    partial = np.bincount(labels, weights=gm.ravel(), minlength=regions + 1)[1 : regions + 1] * voxel
    counted = np.bincount(labels[gm_majority(gm, wm, csf).ravel()], minlength=regions + 1)[1 : regions + 1] * voxel
    etiv = float((gm + wm + csf).sum()) * voxel
    return Reference(np.where(partial > 0, partial, np.nan), np.where(counted > 0, counted, np.nan), etiv)


@functools.lru_cache(maxsize=8)
def template_reference(spacing: int) -> Reference:
    """The MNI152 template's reference volumes on a ``spacing`` mm grid (1..8), as the phantoms render it."""
    if spacing == 1:  # the 1 mm maps directly: load_anatomy(1) would expand ~2 GB per region
        from rmr_lightning.data.anatomy import _input_paths, _read_volumes

        vols, _ = _read_volumes(_input_paths())
        gm, wm = vols["gm"] / 255.0, vols["wm"] / 255.0
        brain = (vols["t1"] > 0) | (gm + wm > 0.5)  # the brain mask of rmr_lightning.data.anatomy
        csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
        return _reference(gm, wm, csf, vols["atlas"].astype(np.int64), 1.0)
    from rmr_lightning.data.anatomy import load_anatomy

    anatomy = load_anatomy(spacing)
    tissues = [t.double().numpy() for t in (anatomy.gm, anatomy.wm, anatomy.csf)]
    return _reference(*tissues, anatomy.labels.numpy(), float(spacing) ** 3)


def reference_spacing(label_map: Path) -> int:
    """The integer grid (1..8 mm) closest to a label map's voxel size; FreeSurfer's conformed space is 1 mm."""
    zooms = nib.load(label_map).header.get_zooms()[:3]
    return int(np.clip(round(float(np.mean(zooms))), 1, 8))


def scaled_volumes(volumes: dict[str, float], etiv: float | None, etiv_ref: float, names: list[str]) -> np.ndarray:
    """Volumes (R,) in region order, scaled to the reference head size (NaN where unmeasured)."""
    scale = etiv_ref / etiv if etiv else 1.0
    return np.array([volumes.get(n, np.nan) * scale for n in names], dtype=np.float64)


def atrophy_measure(scaled: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``1 - V_scaled / V_ref`` per region: the fraction of the reference grey matter that is missing."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - scaled / reference


# ---- finding the files -----------------------------------------------------------------------------
def _read_tsv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _cell_float(value: str | None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _cell_date(value: str | None) -> pd.Timestamp | None:
    if not value or value.strip().lower() in ("n/a", "na", "nan"):
        return None
    date = pd.to_datetime(value.strip(), errors="coerce")
    return None if pd.isna(date) else date.tz_localize(None) if date.tzinfo else date


def find_scans(dataset: Path, suffix: str) -> dict[str, list[Session]]:
    """Sessions with a scan per subject, from pybids; subjects whose scans have no session get []."""
    import bids

    layout = bids.BIDSLayout(str(dataset), validate=False, derivatives=False)
    found: dict[str, dict[str, Path]] = {}
    for f in sorted(layout.get(suffix=suffix, extension=[".nii.gz", ".nii"]), key=lambda f: f.path):
        entities = f.get_entities()
        sessions = found.setdefault(f"sub-{entities['subject']}", {})
        if "session" in entities:
            sessions.setdefault(f"ses-{entities['session']}", Path(f.path))
    return {sub: [Session(sub, ses, path) for ses, path in sorted(s.items())] for sub, s in sorted(found.items())}


def _order_key(s: Session) -> tuple:
    return (s.date is None, s.date or pd.Timestamp(0), s.age is None, s.age or 0.0, s.session)


def add_dates_and_ages(dataset: Path, subject: str, sessions: list[Session], participants: pd.DataFrame | None) -> None:
    """Each session's date (``acq_time``) and age from sessions.tsv; participants.tsv's age for the first
    session when sessions.tsv has none; ages of undated-age sessions from a dated session's age."""
    table = _read_tsv(dataset / subject / f"{subject}_sessions.tsv")
    rows = {} if table is None or "session_id" not in table else {r["session_id"]: r for r in table.to_dict("records")}
    for s in sessions:
        row = rows.get(s.session, {})
        s.date, s.age = _cell_date(row.get("acq_time")), _cell_float(row.get("age"))
    if not sessions:
        return
    ordered = sorted(sessions, key=_order_key)
    if ordered[0].age is None and participants is not None and {"participant_id", "age"} <= set(participants):
        match = participants.loc[participants["participant_id"] == subject, "age"]
        ordered[0].age = _cell_float(match.iloc[0]) if len(match) else None
    known = next((s for s in ordered if s.age is not None and s.date is not None), None)
    for s in sessions:
        if s.age is None and known is not None and s.date is not None:
            s.age = known.age + (s.date - known.date).total_seconds() / 86400.0 / DAYS_PER_YEAR


def freesurfer_dir(derivatives: Path, subject: str, session: str) -> Path | None:
    """A session's FreeSurfer subject folder: ``sub-X_ses-Y.long.*``, ``sub-X_ses-Y`` or ``sub-X/ses-Y``."""
    longitudinal = sorted(p for p in derivatives.glob(f"{subject}_{session}.long.*") if p.is_dir())
    for candidate in (*longitudinal, derivatives / f"{subject}_{session}", derivatives / subject / session):
        if candidate.is_dir():
            return candidate
    return None


def find_segmentation(s: Session) -> None:
    """Fill a session's label map, scheme and stats files from its FreeSurfer folder."""
    for name, scheme in LABEL_MAPS:
        if (s.fs_dir / "mri" / name).is_file():
            s.label_map, s.scheme = s.fs_dir / "mri" / name, scheme
            break
    stats = s.fs_dir / "stats"
    for stem in APARC_STATS[s.scheme or "aparc+aseg"]:
        files = (stats / "aseg.stats", stats / f"lh.{stem}.stats", stats / f"rh.{stem}.stats")
        if all(f.is_file() for f in files):
            s.stats = files
            s.scheme = s.scheme or ("aparc+aseg" if stem == "aparc" else "aparc.DKTatlas+aseg")
            break


def segmented_sessions(
    subject: str, sessions: list[Session], derivatives: Path
) -> tuple[list[Session], list[Excluded]]:
    """The sessions with stats or a label map, and why the others cannot be used."""
    usable, dropped = [], []
    for s in sessions:
        s.fs_dir = freesurfer_dir(derivatives, subject, s.session)
        if s.fs_dir is None:
            dropped.append(
                Excluded("no FreeSurfer output", f"{subject} {s.session}: none under {derivatives}", s.session)
            )
            continue
        find_segmentation(s)
        if s.label_map is None and s.stats is None:
            dropped.append(
                Excluded("no stats or label map", f"{subject} {s.session}: {s.fs_dir} has neither", s.session)
            )
        else:
            usable.append(s)
    return usable, dropped


# ---- volumes -----------------------------------------------------------------------------------------
def label_map_volumes(path: Path, scheme: str, names: list[str]) -> dict[str, float]:
    """Voxel count times voxel volume (mm^3) of each DK84 region in a FreeSurfer-numbered label map. A region
    the scheme labels but the map lacks has volume 0 (segmented away); those the scheme never labels are
    left out (unmeasured)."""
    image = nib.load(path)
    labels = np.asarray(image.dataobj).astype(np.int64).ravel()
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    counts = np.bincount(labels[labels >= 0], minlength=2036)
    absent = set(scheme_absent(scheme, names))
    return {
        n: counts[label] * voxel for n, label in zip(names, freesurfer_labels(names), strict=True) if n not in absent
    }


def session_etiv(s: Session) -> float | None:
    """The eTIV of a session's aseg.stats; None when it has none or cannot be read (no head-size correction)."""
    aseg = s.fs_dir / "stats" / "aseg.stats"
    try:
        return read_aseg(aseg)[1] if aseg.is_file() else None
    except (StatsError, OSError, UnicodeError):
        return None


def session_volumes(s: Session, source: str, names: list[str]) -> dict[str, float]:
    """A session's regional volumes (mm^3) measured by ``source``; ``Excluded`` when its files are unreadable."""
    if source == STATS:
        try:
            volumes = read_aseg(s.stats[0])[0] | read_aparc(s.stats[1], "lh") | read_aparc(s.stats[2], "rh")
        except (StatsError, OSError, UnicodeError) as err:
            raise Excluded("unreadable stats", f"{s.subject} {s.session}: {err}", s.session) from None
        absent = set(scheme_absent(s.scheme, names))
        return {n: v for n, v in volumes.items() if n not in absent}
    try:
        return label_map_volumes(s.label_map, s.scheme, names)
    except Exception as err:  # nibabel raises several types for a corrupt image
        raise Excluded("unreadable label map", f"{s.subject} {s.session}: {s.label_map}: {err}", s.session) from None


def scan_on_label_grid(s: Session) -> Path:
    """The session's scan on its label map's voxel grid: the BIDS scan, else FreeSurfer's ``mri/orig.mgz``."""
    try:
        labels = nib.load(s.label_map)
        for candidate in (s.image, s.fs_dir / "mri" / "orig.mgz"):
            if candidate.is_file():
                image = nib.load(candidate)
                if image.shape[:3] == labels.shape[:3] and np.abs(image.affine - labels.affine).max() <= AFFINE_ATOL:
                    return candidate
    except Exception as err:  # nibabel raises several types for a corrupt header
        raise Excluded("unreadable scan or label map", f"{s.subject} {s.session}: {err}", s.session) from None
    raise Excluded(
        "label map not on the scan's grid",
        f"{s.subject} {s.session}: {s.label_map.name} is on the grid of neither {s.image.name} nor mri/orig.mgz",
        s.session,
    )


# ---- pairing -----------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A subject's baseline and follow-up with what the manifest row needs."""

    base: Session
    follow: Session
    horizon: float
    image: Path
    source: str
    volumes: tuple[dict[str, float], dict[str, float]]
    etiv: float | None  # mean of the pair's eTIVs


def horizon_between(base: Session, follow: Session) -> float:
    """Years from baseline to follow-up: from ``acq_time``, else from the ages; ``Excluded`` if neither or <= 0."""
    if base.date is not None and follow.date is not None:
        horizon = (follow.date - base.date).total_seconds() / 86400.0 / DAYS_PER_YEAR
    elif base.age is not None and follow.age is not None:
        horizon = follow.age - base.age
    else:
        raise Excluded(
            "no dates or ages", f"{base.subject}: {base.session}/{follow.session} lack acq_time and age", follow.session
        )
    if horizon <= 0:
        detail = f"{base.subject}: {follow.session} is {horizon:.3f} years after {base.session}"
        raise Excluded("follow-up not after baseline", detail, follow.session)
    return horizon


def make_pair(base: Session, follow: Session, names: list[str]) -> Pair:
    """The pair's horizon, volumes (stats when both have them, else both label maps) and eTIV; or ``Excluded``."""
    horizon = horizon_between(base, follow)
    source = STATS if base.stats and follow.stats else COUNTS
    if source == COUNTS and follow.label_map is None:
        detail = f"{base.subject} {follow.session}: stats only, and {base.session} lacks stats"
        raise Excluded("no common volume source", detail, follow.session)
    volumes = session_volumes(base, source, names), session_volumes(follow, source, names)
    etivs = [e for e in (session_etiv(base), session_etiv(follow)) if e]
    return Pair(
        base, follow, horizon, scan_on_label_grid(base), source, volumes, float(np.mean(etivs)) if etivs else None
    )


def pair_subject(
    subject: str, sessions: list[Session], derivatives: Path, follow_up: str, names: list[str]
) -> tuple[Pair, list[Excluded]]:
    """A subject's pair and the sessions dropped on the way; ``Excluded`` (the first reason) when none."""
    if len(sessions) < 2:
        raise Excluded("one session", f"{subject}: {len(sessions)} session(s) with a scan")
    usable, dropped = segmented_sessions(subject, sessions, derivatives)
    order = sorted(usable, key=_order_key)
    start = next((k for k, s in enumerate(order) if s.label_map is not None), None)
    if start is None:
        raise (
            dropped[0]
            if len(usable) < 2
            else Excluded("no label map", f"{subject}: no session has aparc+aseg or aparc.DKTatlas+aseg")
        )
    base, later = order[start], order[start + 1 :]
    if base.age is None:
        raise Excluded(
            "no age", f"{subject}: no age at {base.session} in sessions.tsv or participants.tsv", base.session
        )
    failures = []
    for follow in reversed(later) if follow_up == "last" else later:
        try:
            return make_pair(base, follow, names), dropped + failures
        except Excluded as err:
            if err.session == base.session:
                raise
            failures.append(err)
    raise (failures or dropped or [Excluded("no follow-up", f"{subject}: no session after {base.session}")])[0]


# ---- the manifest ------------------------------------------------------------------------------------
def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()


def manifest_row(pair: Pair, names: list[str], folder: Path) -> dict:
    """One manifest row, measures still missing: paths relative to the manifest's folder, eTIV-scaled volumes."""
    reference = template_reference(reference_spacing(pair.base.label_map))
    return {
        "subject_id": pair.base.subject,
        "image": _relative(pair.image, folder),
        "label_map": _relative(pair.base.label_map, folder),
        "label_scheme": pair.base.scheme,
        "age": pair.base.age,
        "horizon": pair.horizon,
        "baseline_session": pair.base.session,
        "followup_session": pair.follow.session,
        "volume_source": pair.source,
        "_reference": reference.of(pair.source),
        "_base": scaled_volumes(pair.volumes[0], pair.etiv, reference.etiv, names),
        "_follow": scaled_volumes(pair.volumes[1], pair.etiv, reference.etiv, names),
    }


def _cohort_reference(rows: list[dict], source: str) -> np.ndarray:
    """Median eTIV-scaled baseline volume per region over the rows measured by ``source`` (NaN if none)."""
    base = np.stack([r["_base"] for r in rows if r["volume_source"] == source])  # (N, R)
    with warnings.catch_warnings():  # regions no row measures stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(base, axis=0)


def add_measures(rows: list[dict], names: list[str]) -> pd.DataFrame:
    """The manifest table: measures per region, with the cohort's median baseline as the reference of the
    regions the template does not label (the subcortical ones)."""
    columns = (
        COLUMNS + (["split"] if any("split" in r for r in rows) else []) + [f"base_{n}" for n in names] + list(names)
    )
    cohort = {source: _cohort_reference(rows, source) for source in {r["volume_source"] for r in rows}}
    table = []
    for r in rows:
        reference = np.where(np.isfinite(r["_reference"]), r["_reference"], cohort[r["volume_source"]])
        measures = dict(zip([f"base_{n}" for n in names], atrophy_measure(r["_base"], reference), strict=True))
        measures |= dict(zip(names, atrophy_measure(r["_follow"], reference), strict=True))
        table.append({k: v for k, v in r.items() if not k.startswith("_")} | measures)
    return pd.DataFrame(table, columns=columns)


def build(
    dataset: Path, derivatives: Path, manifest: Path, follow_up: str = "last", suffix: str = "T1w"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest table, excluded table) for a BIDS dataset; nothing is written."""
    names = dk84_region_names()
    participants = _read_tsv(dataset / "participants.tsv")
    scans = find_scans(dataset, suffix)
    rows, excluded = [], []
    for subject, sessions in scans.items():
        add_dates_and_ages(dataset, subject, sessions, participants)
        try:
            pair, dropped = pair_subject(subject, sessions, derivatives, follow_up, names)
        except Excluded as err:
            excluded.append((subject, err, False))
            continue
        excluded += [(subject, d, True) for d in dropped]
        rows.append(manifest_row(pair, names, manifest.parent) | _given_split(participants, subject))
    if participants is not None and "participant_id" in participants:
        for subject in sorted(set(participants["participant_id"]) - set(scans)):
            excluded.append(
                (
                    subject,
                    Excluded(f"no {suffix}", f"{subject}: in participants.tsv, no *_{suffix}.nii[.gz] found"),
                    False,
                )
            )
    report = [(s, e.session, e.reason, e.detail, kept) for s, e, kept in excluded]
    return add_measures(rows, names), pd.DataFrame(report, columns=REPORT_COLUMNS)


def _given_split(participants: pd.DataFrame | None, subject: str) -> dict[str, str]:
    """A predefined split (``split`` column of participants.tsv: train, val or test) goes into the manifest."""
    if participants is None or not {"participant_id", "split"} <= set(participants):
        return {}
    match = participants.loc[participants["participant_id"] == subject, "split"]
    return {"split": str(match.iloc[0])} if len(match) and isinstance(match.iloc[0], str) else {}


def excluded_path(manifest: Path) -> Path:
    """The report of what was left out, beside the manifest: ``<stem>_excluded.csv``."""
    return manifest.with_name(f"{manifest.stem}_excluded.csv")


def summarise(table: pd.DataFrame, report: pd.DataFrame, manifest: Path) -> None:
    """Rows written and subjects excluded by reason, on the console."""
    from rich.console import Console

    console = Console(highlight=False)
    sources = (
        ", ".join(f"{n} from {s}" for s, n in table["volume_source"].value_counts().items()) if len(table) else "none"
    )
    console.print(f"[bold]{len(table)}[/bold] rows ({sources}) -> {manifest}")
    gone = report[~report["subject_kept"].astype(bool)]
    if len(gone):
        console.print(f"{gone['subject_id'].nunique()} subjects excluded -> {excluded_path(manifest)}")
        for reason, count in gone.groupby("reason")["subject_id"].nunique().sort_values(ascending=False).items():
            console.print(f"  {count:6d}  {reason}")
    kept = report[report["subject_kept"].astype(bool)]
    if len(kept):
        console.print(f"{len(kept)} sessions of included subjects left out (see the report)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="BIDS dataset root (has participants.tsv and sub-*/)")
    parser.add_argument(
        "--derivatives",
        type=Path,
        default=None,
        help="FreeSurfer/FastSurfer subjects folder (default DATASET/derivatives/freesurfer)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="manifest CSV to write")
    parser.add_argument(
        "--follow-up",
        choices=FOLLOW_UPS,
        default="last",
        help="follow-up session: the last (default) or the one after the baseline",
    )
    parser.add_argument("--suffix", default="T1w", help="BIDS suffix of the scans (default T1w)")


def run(args: argparse.Namespace) -> int:
    """Build and write the manifest and its exclusion report; 1 when no row could be made, 2 on bad arguments."""
    dataset = args.dataset
    if not dataset.is_dir():
        print(f"rmr-data bids: {dataset} is not a BIDS dataset folder")
        return 2
    derivatives = args.derivatives or dataset / "derivatives" / "freesurfer"
    if not derivatives.is_dir():
        print(f"rmr-data bids: no FreeSurfer outputs at {derivatives}; give their folder with --derivatives")
        return 2
    table, report = build(dataset, derivatives, args.output, args.follow_up, args.suffix)
    atomic_write_csv(args.output, table)
    atomic_write_csv(excluded_path(args.output), report)
    summarise(table, report, args.output)
    return 0 if len(table) else 1
